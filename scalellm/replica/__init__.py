"""A replica: one engine behind the gRPC service of scalellm/rpc (proto/scalellm/v1/replica.proto).

    config.py       ReplicaConfig: the engine's config, mock settings, where to listen
    launch.py       `scalellm replica` flags (generated from the configs) and startup
    mock_engine.py  the real engine over a fake model, to measure and test everything around the model
    cpu_cost.py     measures the replica's CPU per streamed token
"""
