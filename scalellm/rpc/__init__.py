"""The gateway <-> replica wire: the gRPC service of proto/scalellm/v1/replica.proto, both ends of it.

    pb/          generated message code (regenerate with `python -m scalellm.rpc.codegen`)
    convert.py   protobuf <-> project types; the only importer of pb/
    channel.py   the gRPC options client and server agree on (message size, keepalive)
    client.py    ReplicaClient: the gateway's (and shape control's) side, one Session call per replica
    server.py    ReplicaServer: the replica's side, the service over an EngineClient
    codegen.py   regenerates pb/ from the proto
"""
