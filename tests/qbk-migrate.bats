#!/usr/bin/env bats
# qbk-checkpoint migrate: two real QEMU processes on this machine, the
# destination started with -incoming defer on the same image files (shared
# storage). Checkpoints must arrive intact and keep working for backups.

bats_require_minimum_version 1.5.0
load helpers

# launch_dst: the destination, as launch_vm but waiting for a migration.
launch_dst() {
    run_vm dst- "$T" "${DST_NODE:-disk0-fmt}" -incoming defer \
        -pidfile "$T/dst.pid"
}

dqmp() { qbk-qmp --qmp "$T/dst-test.sock" "$@"; }

# hashes SOCKET: "disk bitmap count sha" of every qbk bitmap, sorted
hashes() {
    local q=$1 node b
    for node in $(qbk-qmp --qmp "$q" query-named-block-nodes '{"flat": true}' |
        jq -r '.[] | select(."dirty-bitmaps" != null and (."dirty-bitmaps" | length) > 0) | ."node-name"'); do
        for b in $(qbk-qmp --qmp "$q" query-named-block-nodes '{"flat": true}' |
            jq -r --arg n "$node" '.[] | select(."node-name" == $n) | ."dirty-bitmaps"[] | select(.name != null) | .name'); do
            echo "$b $(qbk-qmp --qmp "$q" x-debug-block-dirty-bitmap-sha256 \
                "{\"node\": \"$node\", \"name\": \"$b\"}" | jq -r .sha256)"
        done
    done | sort
}

# become_dst: the destination takes over the source's sockets and pid
# file, so that every helper now talks to it.
become_dst() {
    wait_gone "$(cat "$T/qemu.pid")" || kill -KILL "$(cat "$T/qemu.pid")"
    mv "$T/dst-qmp.sock" "$T/qmp.sock"
    mv "$T/dst-test.sock" "$T/test.sock"
    mv "$T/dst.pid" "$T/qemu.pid"
}

setup() {
    common_setup
    two_disk_vm
}

teardown() {
    if [ -n "${T:-}" ] && [ -e "$T/dst.pid" ]; then
        kill -KILL "$(cat "$T/dst.pid")" 2>/dev/null || true
    fi
    common_teardown
}

@test "shared storage: checkpoints arrive intact (recording and not); the next backup there is incremental and exact" {
    pull_with_writes full "disk0 disk1"
    random_writes 4 disk0 disk1
    qbk-checkpoint create mid
    random_writes 4 disk0 disk1
    launch_dst
    run --separate-stderr qbk-checkpoint migrate --to "$T/dst-qmp.sock" \
        --uri "unix:$T/mig.sock" --json
    echo "migrate: status $status: $stderr" >&2
    [ "$status" -eq 0 ]
    echo "$output $stderr"
    [ "$(jq -r .verified <<<"$output")" = true ]
    [ "$(jq '.checkpoints | length' <<<"$output")" -eq 4 ]  # 2 per qcow2 disk
    [ "$(jq '[.checkpoints[] | select(.ok)] | length' <<<"$output")" -eq 4 ]
    # independently: the same bitmaps and contents on both sides
    [ "$(hashes "$T/test.sock")" = "$(hashes "$T/dst-test.sock")" ]
    [ -n "$(hashes "$T/dst-test.sock")" ]
    [ "$(qmp query-status | jq -r .status)" = postmigrate ]
    qmp quit >/dev/null 2>&1 || true
    become_dst
    # the guest goes on writing on the destination; the backup chain too
    random_writes 4 disk0 disk1
    pull_with_writes after "disk0 disk1"
    [ "$(manifest_field after disk0 mode)" = incremental ]
    [ "$(manifest_field after disk1 mode)" = incremental ]
    restore_matches after disk0
    restore_matches after disk1
    assert_clean
}

@test "other node names on the destination (and an auto-named -drive node) pair by disk id" {
    qbk-checkpoint create one
    gw disk0 $((8 << 20)) 65536 9
    DST_NODE=other-fmt launch_dst
    run --separate-stderr qbk-checkpoint migrate --to "$T/dst-qmp.sock" \
        --uri "unix:$T/mig.sock" --json
    echo "migrate: status $status: $stderr" >&2
    [ "$status" -eq 0 ]
    [ "$(jq -r .verified <<<"$output")" = true ]
    [ "$(dqmp query-named-block-nodes '{"flat": true}' |
        jq -r '.[] | select(."node-name" == "other-fmt") | ."dirty-bitmaps"[0].name')" = qbk-000001-one ]
    [ "$(hashes "$T/test.sock")" = "$(hashes "$T/dst-test.sock")" ]
}

@test "the traps: a destination not waiting, an NBD export on the source, a bad --map; nothing changes" {
    qbk-checkpoint create one
    before=$(hashes "$T/test.sock")
    # a destination that is not waiting for a migration
    run -1 qbk-checkpoint migrate --to "$T/test.sock" --uri "unix:$T/mig.sock"
    [[ "$output" == *"not waiting for a migration: start it with -incoming defer"* ]]
    launch_dst
    # a --map to a node the destination does not have
    run -2 qbk-checkpoint migrate --to "$T/dst-qmp.sock" --uri "unix:$T/mig.sock" \
        --map disk0-fmt=nosuch
    [[ "$output" == *"the destination has no node 'nosuch' for disk 'disk0'"* ]]
    qmp nbd-server-start "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"$T/nbd.sock\"}}}" >/dev/null
    # (a writable one would fail the migration; qbk refuses any export)
    qmp block-export-add '{"type": "nbd", "id": "w", "node-name": "disk0-fmt", "writable": false}' >/dev/null
    run -1 qbk-checkpoint migrate --to "$T/dst-qmp.sock" --uri "unix:$T/mig.sock"
    [[ "$output" == *"the source has NBD export 'w': a writable export makes the migration fail"* ]]
    qmp block-export-del '{"id": "w"}' >/dev/null
    run -2 qbk-checkpoint migrate --to "$T/dst-qmp.sock"
    run -2 qbk-checkpoint migrate --uri "unix:$T/mig.sock" --to "$T/dst-qmp.sock" --image "$T/disk0.qcow2"
    [ "$(hashes "$T/test.sock")" = "$before" ]
    [ "$(qmp query-status | jq -r .status)" = prelaunch ]
}

@test "a checkpoint that arrives non-persistent is made persistent, and survives a restart" {
    qbk-checkpoint create one
    gw disk0 $((8 << 20)) 65536 9
    # as a failed earlier attempt can leave it: a qbk checkpoint, not persistent
    qmp block-dirty-bitmap-add '{"node": "disk0-fmt", "name": "qbk-000002p-np", "persistent": false}' >/dev/null
    gw disk0 $((9 << 20)) 65536 10
    launch_dst
    run --separate-stderr qbk-checkpoint migrate --to "$T/dst-qmp.sock" \
        --uri "unix:$T/mig.sock" --json
    echo "migrate: status $status: $stderr" >&2
    [ "$status" -eq 0 ]
    [ "$(jq .made_persistent <<<"$output")" -ge 1 ]
    [ "$(dqmp query-named-block-nodes '{"flat": true}' |
        jq -r '.[] | select(."node-name" == "disk0-fmt") | ."dirty-bitmaps"[] | select(.name == "qbk-000002p-np") | .persistent')" = true ]
    [ "$(hashes "$T/test.sock")" = "$(hashes "$T/dst-test.sock")" ]
    want=$(hashes "$T/dst-test.sock")
    qmp quit >/dev/null 2>&1 || true
    become_dst
    stop_vm
    launch_vm
    [ "$(hashes "$T/test.sock")" = "$want" ]
}

@test "the destination dies mid-migration: the source keeps its checkpoints; a second attempt succeeds and they outlive a restart" {
    qbk-checkpoint create one
    gw disk0 $((8 << 20)) 65536 9
    before=$(hashes "$T/test.sock")
    launch_dst
    # slow enough to be caught in the middle
    qmp migrate-set-parameters '{"max-bandwidth": 1000}' >/dev/null
    qbk-checkpoint migrate --to "$T/dst-qmp.sock" --uri "unix:$T/mig.sock" \
        >"$T/mig.out" 2>"$T/mig.err" &
    pid=$!
    for i in $(seq 100); do
        [ "$(qmp query-migrate | jq -r '.status // empty')" = active ] && break
        sleep 0.05
    done
    kill -KILL "$(cat "$T/dst.pid")"
    rc=0
    wait "$pid" || rc=$?
    cat "$T/mig.err" >&2
    [ "$rc" -eq 1 ]
    grep -q "source checkpoints untouched" "$T/mig.err"
    [ "$(hashes "$T/test.sock")" = "$before" ]
    run -0 qbk-checkpoint check
    [ "$(qmp query-status | jq -r .running)" = false ]
    # then a second attempt succeeds, and the checkpoints outlive a
    # restart of the destination
    qmp migrate-set-parameters '{"max-bandwidth": 1073741824}' >/dev/null
    launch_dst
    run --separate-stderr qbk-checkpoint migrate --to "$T/dst-qmp.sock" \
        --uri "unix:$T/mig2.sock" --json
    echo "second attempt: status $status: $stderr" >&2
    [ "$status" -eq 0 ]
    [ "$(jq -r .verified <<<"$output")" = true ]
    want=$(hashes "$T/dst-test.sock")
    [ "$want" = "$before" ]
    qmp quit >/dev/null 2>&1 || true
    become_dst
    stop_vm
    launch_vm
    [ "$(hashes "$T/test.sock")" = "$want" ]
    run -0 qbk-checkpoint check
}

# launch_dst_on_copies: the destination on copies of the images (no
# shared storage), made while the source is paused and flushed.
launch_dst_on_copies() {
    local d
    for d in disk0 disk1; do
        qmp --hmp "qemu-io -d /machine/peripheral/$d/virtio-backend flush" >/dev/null
    done
    mkdir -p "$T/copy"
    cp --sparse=always "$T/disk0.qcow2" "$T/disk1.qcow2" "$T/disk2.raw" "$T/copy/"
    run_vm dst- "$T/copy" disk0-fmt -incoming defer -pidfile "$T/dst.pid"
}

@test "separate copies of the images: checkpoints arrive intact; the next backup there is exact" {
    pull_with_writes full "disk0 disk1"
    random_writes 4 disk0 disk1
    launch_dst_on_copies
    run --separate-stderr qbk-checkpoint migrate --to "$T/dst-qmp.sock" \
        --uri "unix:$T/mig.sock" --json
    echo "migrate: status $status: $stderr" >&2
    [ "$status" -eq 0 ]
    [ "$(jq -r .verified <<<"$output")" = true ]
    [ "$(hashes "$T/test.sock")" = "$(hashes "$T/dst-test.sock")" ]
    qmp quit >/dev/null 2>&1 || true
    become_dst
    random_writes 4 disk0 disk1
    pull_with_writes after "disk0 disk1"
    [ "$(manifest_field after disk0 mode)" = incremental ]
    restore_matches after disk0
    restore_matches after disk1
}

@test "through storage: stopped on one side, started on the other on the same files; next backup exact" {
    pull_with_writes full "disk0 disk1"
    random_writes 4 disk0 disk1
    want=$(hashes "$T/test.sock")
    stop_vm
    launch_vm   # "the other host": a new QEMU on the same qcow2 files
    [ "$(hashes "$T/test.sock")" = "$want" ]
    random_writes 4 disk0 disk1
    pull_with_writes after "disk0 disk1"
    [ "$(manifest_field after disk0 mode)" = incremental ]
    restore_matches after disk0
    restore_matches after disk1
}
