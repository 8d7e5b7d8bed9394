"""A replica: one engine behind the gRPC service of proto/scalellm/v1/replica.proto.

    server.py       the gRPC service over an EngineClient (real engine or mock)
    convert.py      protobuf <-> project types; the only importer of the generated code in pb/
    mock_engine.py  a synthetic engine, to measure and test everything around the model
    launch.py       `scalellm replica` flags and startup
    codegen.py      regenerates pb/ from the proto
    cpu_cost.py     measures the replica's CPU per streamed token
"""
