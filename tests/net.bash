# Ports for the tests and benchmarks that listen on TCP. Sourced by
# helpers.bash and bench/remote.

# free_port: a TCP port on this host that no socket uses now. It lies below
# the kernel's ephemeral range, so no outgoing connection (ours or another
# run's) can take it between this check and the listen; a random port in
# that range can, and QEMU then fails with "Address already in use".
free_port() {
    local lo=10000 hi p
    read -r hi _ </proc/sys/net/ipv4/ip_local_port_range
    ((hi > lo + 1000)) || hi=32768
    while :; do
        p=$((lo + RANDOM % (hi - lo)))
        ss -Htan "sport = :$p" | grep -q . || { echo "$p"; return; }
    done
}
