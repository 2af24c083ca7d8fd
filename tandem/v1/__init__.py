"""Generated wire code (scripts/gen_proto.py); do not edit."""
