"""Generated protobuf code (do not edit; see scalellm/rpc/codegen.py). Only convert.py imports it."""
