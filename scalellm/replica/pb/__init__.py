"""Generated protobuf code (do not edit; see scalellm/replica/codegen.py). Only convert.py imports it."""
