#!/usr/bin/env bats
# qbk-pull against a qemu-storage-daemon: no devices, the "guest" writes
# through a writable NBD export on a throttle node above the disk (the set
# up of bench/cow). Scheme B puts its filter under the throttle node with
# blockdev-reopen; every backup is checked against the shadow model.

bats_require_minimum_version 1.5.0
load helpers

# The guest's writes go through the NBD export of the throttle node.
guest_write() {
    qemu-io -f raw "nbd+unix:///guest?socket=$T/nbd.sock" \
        -c "write -P $4 $2 $3" >/dev/null
}

start_qsd() {
    qemu-img create -q -f qcow2 "$T/disk0.qcow2" "$DISK_SIZE"
    rm -f "$T/qmp.sock" "$T/test.sock"
    qemu-storage-daemon \
        --chardev "socket,path=$T/qmp.sock,server=on,wait=off,id=m0" \
        --monitor chardev=m0 \
        --chardev "socket,path=$T/test.sock,server=on,wait=off,id=m1" \
        --monitor chardev=m1 \
        --object throttle-group,id=tg0 \
        --blockdev "driver=file,filename=$T/disk0.qcow2,node-name=d0-file,cache.direct=on,aio=native" \
        --blockdev driver=qcow2,file=d0-file,node-name=d0-fmt \
        --blockdev driver=throttle,throttle-group=tg0,file=d0-fmt,node-name=guest0 \
        --nbd-server "addr.type=unix,addr.path=$T/nbd.sock" \
        --export type=nbd,id=guest,node-name=guest0,name=guest,writable=on \
        --pidfile "$T/qsd.pid" --daemonize "$@"
}

# start_plain_qsd: the disk's node exported as it is, and no --object: so
# QEMU has no /objects container until something is added there.
start_plain_qsd() {
    qemu-img create -q -f qcow2 "$T/disk0.qcow2" "$DISK_SIZE"
    qemu-storage-daemon \
        --chardev "socket,path=$T/qmp.sock,server=on,wait=off,id=m0" \
        --monitor chardev=m0 \
        --chardev "socket,path=$T/test.sock,server=on,wait=off,id=m1" \
        --monitor chardev=m1 \
        --blockdev "driver=file,filename=$T/disk0.qcow2,node-name=d0-file" \
        --blockdev driver=qcow2,file=d0-file,node-name=d0-fmt \
        --nbd-server "addr.type=unix,addr.path=$T/nbd.sock" \
        --export type=nbd,id=guest,node-name=d0-fmt,name=guest,writable=on \
        --pidfile "$T/qsd.pid" --daemonize
}

# The throttle node reads from the disk's node again; nothing of ours left.
qsd_clean() {
    [ "$(qmp query-block-exports | jq -c '[.[].id]')" = '["guest"]' ]
    [ "$(qmp query-named-block-nodes '{"flat": true}' |
        jq '[.[] | select(."node-name" | startswith("qbk-"))] | length')" -eq 0 ]
    [ "$(qmp x-debug-query-block-graph | jq -r '
        (.nodes | map({key: (.id | tostring), value: .name}) | from_entries) as $n
        | .edges[] | select($n[.parent | tostring] == "guest0" and .name == "file")
        | $n[.child | tostring]')" = d0-fmt ]
    [ -z "$(ls -A "$T/repo/.scratch" 2>/dev/null)" ]
}

setup() {
    common_setup
    if [[ "$BATS_TEST_DESCRIPTION" == *"over 4 GiB"* ]]; then
        DISK_SIZE=5G
    fi
    if [[ "$BATS_TEST_DESCRIPTION" == *"without objects"* ]]; then
        start_plain_qsd
    else
        start_qsd
    fi
    shadow_init disk0
    gw disk0 0 $((8 << 20)) 17
    gw disk0 $((40 << 20)) 3145728 34
}

teardown() {
    common_teardown
}

@test "qemu-storage-daemon: B under a throttle node (blockdev-reopen), full and incremental exact" {
    pull_with_writes full disk0 --node d0-fmt=disk0 --nbd-server "$T/nbd.sock"
    [ "$(jq -r .fleece "$T/pull-full.json")" = B ]
    [ "$(manifest_field full disk0 copier | jq .bytes_released)" -eq $((64 << 20)) ]
    restore_matches full disk0
    qsd_clean
    random_writes 6 disk0
    pull_with_writes inc disk0 --node d0-fmt=disk0 --nbd-server "$T/nbd.sock"
    [ "$(manifest_field inc disk0 mode)" = incremental ]
    restore_matches inc disk0
    qsd_clean
}

@test "a qemu-storage-daemon without objects (no /objects yet): full and incremental exact, nothing left" {
    run -1 qmp qom-list '{"path": "/objects"}'
    pull_with_writes full disk0 --node d0-fmt=disk0 --nbd-server "$T/nbd.sock"
    restore_matches full disk0
    random_writes 4 disk0
    pull_with_writes inc disk0 --node d0-fmt=disk0 --nbd-server "$T/nbd.sock"
    [ "$(manifest_field inc disk0 mode)" = incremental ]
    restore_matches inc disk0
    [ "$(qmp query-block-exports | jq -c '[.[].id]')" = '["guest"]' ]
    [ "$(qmp qom-list '{"path": "/objects"}' | jq '[.[] | select(.name | startswith("qbk-"))] | length')" -eq 0 ]
}

@test "qemu-storage-daemon: SIGKILL under B, the next run reopens the throttle node back" {
    pull_with_writes full disk0 --node d0-fmt=disk0 --nbd-server "$T/nbd.sock"
    start_pull killed --node d0-fmt=disk0 --nbd-server "$T/nbd.sock" --rate-limit 1M
    pid=$PULL_PID
    wait_fleeced "$T/progress-killed" "$pid"
    kill -KILL "$pid"
    wait "$pid" || true
    [ "$(qmp query-named-block-nodes '{"flat": true}' |
        jq '[.[] | select(."node-name" | startswith("qbk-c"))] | length')" -eq 1 ]
    random_writes 4 disk0
    pull_with_writes after disk0 --node d0-fmt=disk0 --nbd-server "$T/nbd.sock"
    [ "$(manifest_field after disk0 mode)" = incremental ]
    restore_matches after disk0
    qsd_clean
}

@test "a disk with two users: B is refused with the reason, auto falls back to A" {
    # a second, read-only export straight on the disk's node
    qmp block-export-add '{"type": "nbd", "id": "ro", "node-name": "d0-fmt",
        "name": "ro", "writable": false}' >/dev/null
    run -1 qbk-pull --repo "$T/repo" --node d0-fmt=disk0 --nbd-server "$T/nbd.sock" --fleece B
    [[ "$output" == *"cannot fleece with scheme B: disk 'disk0': node 'd0-fmt' is used by an export or a job"* ]]
    pull_with_writes auto disk0 --node d0-fmt=disk0 --nbd-server "$T/nbd.sock"
    [ "$(jq -r .fleece "$T/pull-auto.json")" = A ]
    restore_matches auto disk0
    run -2 qbk-pull --repo "$T/repo" --node nosuch=disk0
    [[ "$output" == *"no block node 'nosuch'"* ]]
}

@test "disk ids name directories one to one: a non-plain id, or two alike, is refused" {
    # two nodes of the same disk stand in for two disks
    for args in "--node d0-fmt=a/b --node guest0=a_b" \
        "--node d0-fmt=x --node guest0=x" "--node d0-fmt=.. " \
        "--node d0-fmt=disk0 --node guest0=disk0"; do
        run qbk-pull --repo "$T/repo" --nbd-server "$T/nbd.sock" $args
        echo "$args: $output"
        [ "$status" -eq 2 ]
        assert_one_line_error
        [ -z "$(ls -A "$T/repo/disks" 2>/dev/null)" ]
        [ -z "$(ls -A "$T/repo/backups" 2>/dev/null)" ]
    done
    qsd_clean
}

@test "a disk over 4 GiB: planning and notice sweeps in NBD-sized pieces; exact" {
    gw disk0 $((4608 << 20)) 1048576 68     # at 4.5 GiB
    pull_with_writes full disk0 --node d0-fmt=disk0 --nbd-server "$T/nbd.sock"
    [ "$(jq -r .fleece "$T/pull-full.json")" = B ]
    restore_matches full disk0
    random_writes 6 disk0
    pull_with_writes inc disk0 --node d0-fmt=disk0 --nbd-server "$T/nbd.sock" --fleece A
    restore_matches inc disk0
    qsd_clean
}
