#!/usr/bin/env bats
# A backup host and a hypervisor in two network namespaces joined by a
# veth pair: QEMU listens (QMP and NBD, TLS) on the hypervisor's address
# only, qbk runs in the other namespace. Needs root (ip netns); CI is root.

bats_require_minimum_version 1.5.0
load helpers
load tls

setup() {
    common_setup
    if [ "$(id -u)" -ne 0 ]; then
        skip "network namespaces need root"
    fi
    local n=$((RANDOM % 250 + 1)) tag=$$$RANDOM
    HV_NS=qbk-hv-$tag BH_NS=qbk-bh-$tag
    HV_LINK=qh$n-$((RANDOM % 1000)) BH_LINK=qb$n-$((RANDOM % 1000))
    HV_IP=10.77.$n.1 BH_IP=10.77.$n.2
    echo "$HV_NS $BH_NS" >"$T/netns"
    ip netns add "$HV_NS"
    ip netns add "$BH_NS"
    ip link add "$HV_LINK" type veth peer name "$BH_LINK"
    ip link set "$HV_LINK" netns "$HV_NS"
    ip link set "$BH_LINK" netns "$BH_NS"
    ip -n "$HV_NS" addr add "$HV_IP/30" dev "$HV_LINK"
    ip -n "$BH_NS" addr add "$BH_IP/30" dev "$BH_LINK"
    for ns in "$HV_NS" "$BH_NS"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$HV_NS" link set "$HV_LINK" up
    ip -n "$BH_NS" link set "$BH_LINK" up
    PKI_SERVER_IP=$HV_IP make_pki
    PORT=$((20000 + RANDOM % 20000))
    NPORT=$((PORT + 1))
    VM_NETNS=$HV_NS
    # shellcheck disable=SC2046
    start_vm -name netns-vm -object "tls-creds-x509,id=qbktls0,dir=$T/pki/server,endpoint=server,verify-peer=on" \
        -chardev "socket,id=tlsmon0,host=$HV_IP,port=$PORT,server=on,wait=off,tls-creds=qbktls0" \
        -mon chardev=tlsmon0,mode=control
    mkdir -m 700 "$T/hv-scratch"
    shadow_init disk0 disk1
    gw disk0 0 1048576 17
    gw disk1 $((5 << 20)) 2097152 51
    export QBK_QMP=tls:$HV_IP:$PORT QBK_TLS_CREDS=$T/pki/client
    PULL_NETNS=$BH_NS
}

teardown() {
    common_teardown
    local ns
    for ns in ${HV_NS:-} ${BH_NS:-}; do
        ip netns del "$ns"
    done
}

# in the backup host's namespace
bh() {
    ip netns exec "$BH_NS" "$@"
}

@test "across two network namespaces: QMP and NBD over TLS on the hypervisor's address only; full and incremental exact" {
    # QEMU listens on the hypervisor's address, and nowhere else
    run -0 ip netns exec "$HV_NS" ss -Hltn
    echo "$output"
    [[ "$output" == *"$HV_IP:$PORT"* ]]
    [ -z "$(ss -Hltn "sport = :$PORT")" ]
    run -0 bh qbk-checkpoint disks
    pull_with_writes full "disk0 disk1" --nbd-listen "$HV_IP:$NPORT" --scratch-dir "$T/hv-scratch"
    restore_matches full disk0
    restore_matches full disk1
    random_writes 4 disk0 disk1
    pull_with_writes inc "disk0 disk1" --nbd-listen "$HV_IP:$NPORT" --scratch-dir "$T/hv-scratch"
    [ "$(manifest_field inc disk0 mode)" = incremental ]
    restore_matches inc disk0
    restore_matches inc disk1
    # from the root namespace the hypervisor cannot be reached at all
    run qbk-checkpoint --timeout 2 list
    [ "$status" -eq 1 ]
    assert_one_line_error
    assert_clean
}

@test "the network path cut mid-copy: a clear error after the stall timeout; with the path back the next backup is exact" {
    pull_with_writes full "disk0 disk1" --nbd-listen "$HV_IP:$NPORT" --scratch-dir "$T/hv-scratch"
    random_writes 4 disk0 disk1
    gw disk0 $((30 << 20)) $((4 << 20)) 66
    start_pull cut --nbd-listen "$HV_IP:$NPORT" --scratch-dir "$T/hv-scratch" \
        --rate-limit 512K --stall-timeout 2 --timeout 2
    wait_fleeced "$T/progress-cut" "$PULL_PID"
    wait_copying "$T/progress-cut" "$PULL_PID"
    # the cable is pulled: no reset, just silence
    ip -n "$BH_NS" link set "$BH_LINK" down
    rc=0
    wait "$PULL_PID" || rc=$?
    cat "$T/pull-cut.err"
    [ "$rc" -eq 1 ]
    [ "$(grep -c . "$T/pull-cut.err")" -eq 1 ]
    grep -q "no progress for 2 s" "$T/pull-cut.err"
    # QEMU is only out of reach: its marks tell the next run what to undo
    grep -q "the next qbk-pull (or check --repair) will" "$T/pull-cut.err"
    ip -n "$BH_NS" link set "$BH_LINK" up
    # the next run finds what the cut one left in QEMU and undoes it; the
    # incremental misses no write made since the full
    random_writes 4 disk0 disk1
    pull_with_writes after "disk0 disk1" --nbd-listen "$HV_IP:$NPORT" --scratch-dir "$T/hv-scratch"
    [ "$(manifest_field after disk0 mode)" = incremental ]
    [ "$(manifest_field after disk0 parent)" = "$(jq -r .id "$T/pull-full.json")" ]
    restore_matches after disk0
    restore_matches after disk1
    assert_clean
}

@test "two backup hosts, one repository: the lock holds across network namespaces (nothing in it is tied to a host's network); the other host takes the next incremental" {
    # the hypervisor's namespace plays a second backup host: it reaches
    # QMP on its own address
    start_pull first --nbd-listen "$HV_IP:$NPORT" --scratch-dir "$T/hv-scratch" \
        --rate-limit 4M --json
    first=$PULL_PID
    wait_fleeced "$T/progress-first" "$first"
    snapshot first disk0 disk1
    run ip netns exec "$HV_NS" qbk-pull --repo "$T/repo" --nbd-listen "$HV_IP:$((NPORT + 1))" \
        --scratch-dir "$T/hv-scratch"
    echo "$output"
    [ "$status" -eq 1 ]
    assert_one_line_error
    [[ "$output" == *"another qbk-pull or qbk-merge is working on"* ]]
    run ip netns exec "$HV_NS" qbk-merge --repo "$T/repo" --keep-daily 1
    [ "$status" -eq 1 ]
    [[ "$output" == *"another qbk-pull or qbk-merge is working on"* ]]
    wait "$first" || { cat "$T/pull-first.err"; false; }
    restore_matches first disk0
    random_writes 4 disk0 disk1
    PULL_NETNS=$HV_NS
    pull_with_writes second "disk0 disk1" --nbd-listen "$HV_IP:$NPORT" --scratch-dir "$T/hv-scratch"
    [ "$(manifest_field second disk0 mode)" = incremental ]
    [ "$(manifest_field second disk0 parent)" = "$(jq -r .id "$T/pull-first.json")" ]
    restore_matches second disk0
    restore_matches second disk1
    assert_clean
}
