# Host-network snapshot for scripts/compose_e2e.sh: what a Docker engine could change on the host
# (forwarding, links, iptables rules), printed so that two snapshots compare with cmp/diff.
# Sourced, not run. An absent iptables and one that holds only the built-in chains' ACCEPT
# policies print the same (nothing): installing docker.io brings iptables, whose `-S` then lists
# those defaults, and that is not a change the engine made (issue 25). A DROP policy, a rule or a
# chain still shows.

net_state() {
    sysctl -n net.ipv4.ip_forward 2>/dev/null
    ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sort
    local table
    if command -v iptables >/dev/null 2>&1; then
        for table in filter nat; do
            iptables -t "$table" -S 2>/dev/null | sed "s/^/$table: /" \
                | { grep -vxE -- "$table: -P [A-Z]+ ACCEPT" || true; }
        done
    fi
}

# net_state_changed BEFORE AFTER: prints the diff and returns 0 when the snapshots differ
net_state_changed() {
    cmp -s "$1" "$2" && return 1
    diff "$1" "$2" || true
    return 0
}
