"""A replica: one engine behind the gRPC service of scalellm/rpc (proto/scalellm/v1/replica.proto).

    mock_engine.py  a synthetic engine, to measure and test everything around the model
    launch.py       `scalellm replica` flags and startup
    cpu_cost.py     measures the replica's CPU per streamed token
"""
