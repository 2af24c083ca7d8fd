"""A testbed of separate hosts on one machine (network namespaces, shaped veth links)."""
