"""Generated protocol code for shoal.v1 (see protos/)."""
