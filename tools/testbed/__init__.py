"""A testbed of separate hosts on one machine (network namespaces, shaped veth links), the delaying
proxy the tests and benches put between a device and an edge, and a hostile edge server
(fake_edge) for the device's tenancy tests and bench/attack_device.py."""
