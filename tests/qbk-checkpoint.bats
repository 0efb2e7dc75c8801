#!/usr/bin/env bats
# qbk-checkpoint against a real QEMU (q35, paused, no guest OS): two qcow2
# disks, a raw disk and a CD-ROM. Data is checked through QEMU's own view
# of the bitmaps: dirty counts and x-debug-block-dirty-bitmap-sha256.

bats_require_minimum_version 1.5.0
load helpers

setup() {
    common_setup
}

teardown() {
    common_teardown
}

@test "disks: qcow2 disks found, raw disk refused with a reason, CD-ROM skipped" {
    start_vm
    run qbk-checkpoint disks --json
    [ "$status" -eq 0 ]
    [ "$(jq -r '[.disks[].disk] | sort | join(",")' <<<"$output")" = "disk0,disk1,disk2" ]
    [ "$(jq -r '.disks[] | select(.disk=="disk0") | .node' <<<"$output")" = "disk0-fmt" ]
    [ "$(jq -r '.disks[] | select(.disk=="disk1") | .driver' <<<"$output")" = "qcow2" ]
    [ "$(jq -r '.disks[] | select(.disk=="disk0") | .size' <<<"$output")" = "67108864" ]
    [ "$(jq -r '.disks[] | select(.disk=="disk2") | .checkpoints_supported' <<<"$output")" = "false" ]
    [[ "$(jq -r '.disks[] | select(.disk=="disk2") | .reason' <<<"$output")" == *"only qcow2"* ]]
}

@test "create: one persistent recording bitmap per qcow2 disk, previous one disabled" {
    start_vm
    run --separate-stderr qbk-checkpoint create mon
    [ "$status" -eq 0 ]
    [ "$output" = "mon" ]
    [ "$stderr" = "qbk-checkpoint: created checkpoint 'mon' (bitmap qbk-000001-mon) on 2 disk(s)" ]
    for d in disk0 disk1; do
        [ "$(bitmap_names $d)" = "qbk-000001-mon" ]
        [ "$(bitmap_field $d qbk-000001-mon persistent)" = true ]
        [ "$(bitmap_field $d qbk-000001-mon recording)" = true ]
    done
    run qbk-checkpoint --json create tue
    [ "$status" -eq 0 ]
    [ "$(jq -r .bitmap <<<"$output")" = "qbk-000002-tue" ]
    for d in disk0 disk1; do
        [ "$(bitmap_field $d qbk-000001-mon recording)" = false ]
        [ "$(bitmap_field $d qbk-000002-tue recording)" = true ]
    done
}

@test "create: the default name is the UTC time, unique within a second" {
    start_vm
    run --separate-stderr qbk-checkpoint create
    [ "$status" -eq 0 ]
    [[ "$output" =~ ^[0-9]{8}T[0-9]{6}Z$ ]]
    first=$output
    run --separate-stderr qbk-checkpoint create
    [ "$status" -eq 0 ]
    [[ "$output" =~ ^[0-9]{8}T[0-9]{6}Z(\.[0-9]+)?$ ]]
    [ "$output" != "$first" ]
    [ "$(qbk-checkpoint list --json | jq '.checkpoints | length')" -eq 2 ]
}

@test "writes land in the recording checkpoint only" {
    start_vm
    qbk-checkpoint create a
    guest_write disk0 0 1M
    qbk-checkpoint create b
    sha_a=$(bitmap_sha disk0 qbk-000001-a)
    guest_write disk0 4M 64k
    guest_write disk1 0 128k
    [ "$(ckpt_count a disk0)" -eq 1048576 ]
    [ "$(ckpt_count a disk1)" -eq 0 ]
    [ "$(ckpt_count b disk0)" -eq 65536 ]
    [ "$(ckpt_count b disk1)" -eq 131072 ]
    # a's content did not move after b took over
    [ "$(bitmap_sha disk0 qbk-000001-a)" = "$sha_a" ]
}

@test "create is atomic: a failure on one disk changes no disk" {
    start_vm
    qbk-checkpoint create a
    # Exporting a's bitmap over NBD makes it busy on disk0 only, so the
    # transaction's "disable a on disk0" fails after disk1's actions.
    qmp nbd-server-start "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"$T/nbd.sock\"}}}"
    qmp block-export-add '{"type": "nbd", "id": "e0", "node-name": "disk0-fmt",
        "bitmaps": [{"node": "disk0-fmt", "name": "qbk-000001-a"}]}'
    fails 1 "in use" qbk-checkpoint create b
    for d in disk0 disk1; do
        [ "$(bitmap_names $d)" = "qbk-000001-a" ]
        [ "$(bitmap_field $d qbk-000001-a recording)" = true ]
    done
}

@test "since NAME is the union of the chain from NAME, at one instant" {
    start_vm
    qbk-checkpoint create a
    guest_write disk0 0 64k
    qbk-checkpoint create b
    guest_write disk0 1M 64k
    guest_write disk0 0 64k          # again: counted once in the union
    qbk-checkpoint create c
    guest_write disk0 2M 128k
    guest_write disk1 8M 64k
    run --separate-stderr qbk-checkpoint since a --json
    [ "$status" -eq 0 ]
    # {0, 1M} x 64k and 2M x 128k
    [ "$(jq -r '.disks[] | select(.disk=="disk0") | .dirty_bytes' <<<"$output")" -eq $((64*1024*2 + 128*1024)) ]
    [ "$(jq -r '.disks[] | select(.disk=="disk1") | .dirty_bytes' <<<"$output")" -eq 65536 ]
    # The same union computed by hand in QEMU has the same content.
    qmp block-dirty-bitmap-add '{"node": "disk0-fmt", "name": "manual", "disabled": true}'
    qmp block-dirty-bitmap-merge '{"node": "disk0-fmt", "target": "manual",
        "bitmaps": ["qbk-000001-a", "qbk-000002-b", "qbk-000003-c"]}'
    [ "$(bitmap_sha disk0 qbk-since-a)" = "$(bitmap_sha disk0 manual)" ]
    # It is a snapshot: later writes do not change it, and it is transient.
    guest_write disk0 16M 64k
    [ "$(bitmap_field disk0 qbk-since-a recording)" = false ]
    [ "$(bitmap_field disk0 qbk-since-a persistent)" = false ]
    [ "$(bitmap_sha disk0 qbk-since-a)" = "$(bitmap_sha disk0 manual)" ]
    # since c covers only c's period.
    run --separate-stderr qbk-checkpoint since c --into only-c --json
    [ "$(jq -r '.disks[] | select(.disk=="disk0") | .dirty_bytes' <<<"$output")" -eq $((128*1024 + 64*1024)) ]
    [ "$(jq -r '.disks[] | select(.disk=="disk1") | .dirty_bytes' <<<"$output")" -eq 65536 ]
    run qbk-checkpoint since a --drop
    [ "$status" -eq 0 ]
    [ -z "$(bitmap_names disk0 | grep -x qbk-since-a)" ]
}

@test "delete merges into the predecessor: since older checkpoints is unchanged" {
    start_vm
    qbk-checkpoint create a
    guest_write disk0 0 64k
    qbk-checkpoint create b
    guest_write disk0 1M 64k
    qbk-checkpoint create c
    guest_write disk0 2M 64k
    qbk-checkpoint since a --into before
    sha_before=$(bitmap_sha disk0 before)
    run qbk-checkpoint delete b
    [ "$status" -eq 0 ]
    [ "$(bitmap_names disk0 | grep -c '^qbk-0')" -eq 2 ]
    [ "$(ckpt_count a disk0)" -eq 131072 ]   # a now holds a+b
    qbk-checkpoint since a --into after
    [ "$(bitmap_sha disk0 after)" = "$sha_before" ]
    # Deleting the recording checkpoint lets its predecessor record again.
    run qbk-checkpoint delete c
    [ "$status" -eq 0 ]
    [ "$(bitmap_field disk0 qbk-000001-a recording)" = true ]
    [ "$(bitmap_field disk1 qbk-000001-a recording)" = true ]
    guest_write disk0 3M 64k
    [ "$(ckpt_count a disk0)" -eq $((4*65536)) ]
    # The oldest goes without a merge.
    run qbk-checkpoint delete a
    [ "$status" -eq 0 ]
    [ "$(qbk-checkpoint list --json | jq '.checkpoints | length')" -eq 0 ]
}

@test "checkpoints and their contents survive a clean QEMU restart" {
    start_vm
    qbk-checkpoint create a
    guest_write disk0 0 256k
    qbk-checkpoint create b
    guest_write disk1 1M 64k
    sha_a=$(bitmap_sha disk0 qbk-000001-a)
    sha_b=$(bitmap_sha disk1 qbk-000002-b)
    # disk1's node is auto-named and changes across restarts: leave it out
    list_before=$(qbk-checkpoint list --json | jq -c 'del(.checkpoints[].disks[].node)')
    stop_vm
    launch_vm
    [ "$(qbk-checkpoint list --json | jq -c 'del(.checkpoints[].disks[].node)')" = "$list_before" ]
    [ "$(bitmap_sha disk0 qbk-000001-a)" = "$sha_a" ]
    [ "$(bitmap_sha disk1 qbk-000002-b)" = "$sha_b" ]
    run qbk-checkpoint check
    [ "$status" -eq 0 ]
    [[ "$output" == *"checkpoints are healthy"* ]]
}

@test "after kill -9: check reports inconsistent bitmaps, --repair recovers" {
    start_vm
    qbk-checkpoint create a
    qbk-checkpoint create b
    stop_vm            # now stored in the images, and loaded at next start
    launch_vm
    guest_write disk0 0 64k
    kill_vm
    launch_vm
    run qbk-checkpoint check --json
    [ "$status" -eq 3 ]
    [ "$(jq -r .healthy <<<"$output")" = false ]
    [ "$(jq '[.issues[] | select(.kind=="inconsistent")] | length' <<<"$output")" -eq 4 ]
    [ "$(jq -r '.disks[] | select(.disk=="disk0") | .full_backup_required' <<<"$output")" = true ]
    # An incremental since a cannot be computed, and says why.
    fails 3 "full backup" qbk-checkpoint since a
    run qbk-checkpoint check --repair
    [ "$status" -eq 0 ]
    [[ "$output" == *"disk0: next backup must be full"* ]]
    [ -z "$(bitmap_names disk0)" ]
    [ -z "$(bitmap_names disk1)" ]
    run qbk-checkpoint check
    [ "$status" -eq 0 ]
    # A new chain starts and records.
    qbk-checkpoint create fresh
    guest_write disk0 0 64k
    [ "$(ckpt_count fresh disk0)" -eq 65536 ]
}

@test "a checkpoint never flushed before kill -9 is gone, and check says full" {
    start_vm
    qbk-checkpoint create a
    kill_vm
    launch_vm
    run qbk-checkpoint check --json
    [ "$status" -eq 0 ]
    [ "$(jq -r '.disks[] | select(.disk=="disk0") | .full_backup_required' <<<"$output")" = true ]
    run qbk-checkpoint since a
    [ "$status" -eq 2 ]
    assert_one_line_error
}

@test "check: a bitmap missing on one disk breaks that disk's older checkpoints only" {
    start_vm
    qbk-checkpoint create a
    qbk-checkpoint create b
    qbk-checkpoint create c
    qmp block-dirty-bitmap-remove '{"node": "disk0-fmt", "name": "qbk-000002-b"}'
    run qbk-checkpoint check --json
    [ "$status" -eq 3 ]
    [ "$(jq -r '.issues[] | select(.kind=="missing") | .disk' <<<"$output")" = disk0 ]
    [ "$(jq -c '.disks[] | select(.disk=="disk0") | .untrusted' <<<"$output")" = '["a"]' ]
    [ "$(jq -c '.disks[] | select(.disk=="disk0") | .trusted' <<<"$output")" = '["c"]' ]
    [ "$(jq -c '.disks[] | select(.disk=="disk1") | .untrusted' <<<"$output")" = '[]' ]
    run qbk-checkpoint check --repair
    [ "$status" -eq 0 ]
    [ "$(bitmap_names disk0)" = "qbk-000003-c" ]
    [ "$(bitmap_names disk1 | tr '\n' ' ')" = "qbk-000001-a qbk-000002-b qbk-000003-c " ]
}

@test "check: a newest checkpoint that stopped recording makes the disk need a full backup" {
    start_vm
    qbk-checkpoint create a
    qbk-checkpoint create b
    qmp block-dirty-bitmap-disable '{"node": "disk0-fmt", "name": "qbk-000002-b"}'
    run qbk-checkpoint check
    [ "$status" -eq 3 ]
    [[ "$output" == *"disk0: error: newest checkpoint bitmap 'qbk-000002-b' does not record"* ]]
    [[ "$output" == *"disk0: untrusted: a, b; next backup must be full"* ]]
    [[ "$output" == *"disk1: incremental since: a, b"* ]]
    run qbk-checkpoint check --repair
    [ "$status" -eq 0 ]
    [ -z "$(bitmap_names disk0)" ]
}

@test "check: a stale recording bitmap is a warning, and --repair disables it" {
    start_vm
    qbk-checkpoint create a
    qbk-checkpoint create b
    qmp block-dirty-bitmap-enable '{"node": "disk1-fmt", "name": "qbk-000001-a"}' 2>/dev/null ||
        qmp block-dirty-bitmap-enable "{\"node\": \"$(node_of disk1)\", \"name\": \"qbk-000001-a\"}"
    run qbk-checkpoint check --json
    [ "$status" -eq 0 ]
    [ "$(jq -r '.issues[] | select(.kind=="stale-recording") | .severity' <<<"$output")" = warning ]
    run qbk-checkpoint check --repair
    [ "$status" -eq 0 ]
    [ "$(bitmap_field disk1 qbk-000001-a recording)" = false ]
    [ "$(bitmap_field disk1 qbk-000002-b recording)" = true ]
}

@test "foreign bitmaps are reported and never touched" {
    start_vm
    qmp block-dirty-bitmap-add '{"node": "disk0-fmt", "name": "vendor", "persistent": true}'
    guest_write disk0 0 64k
    sha=$(bitmap_sha disk0 vendor)
    qbk-checkpoint create a
    qbk-checkpoint create b
    qbk-checkpoint delete a
    run qbk-checkpoint check --repair --json
    [ "$status" -eq 0 ]
    [ "$(jq -r '.issues[] | select(.kind=="foreign") | .bitmap' <<<"$output")" = vendor ]
    [ "$(bitmap_field disk0 vendor recording)" = true ]
    guest_write disk0 1M 64k
    [ "$(bitmap_field disk0 vendor count)" -eq 131072 ]
    [ "$(qbk-checkpoint list --json | jq -r '[.checkpoints[].name] | join(",")')" = b ]
}

@test "--disk: a checkpoint on some disks only is marked partial and not a gap" {
    start_vm
    qbk-checkpoint create a
    run qbk-checkpoint create b --disk disk0
    [ "$status" -eq 0 ]
    [ "$(bitmap_names disk0 | tr '\n' ' ')" = "qbk-000001-a qbk-000002p-b " ]
    [ "$(bitmap_names disk1)" = "qbk-000001-a" ]
    [ "$(bitmap_field disk1 qbk-000001-a recording)" = true ]
    qbk-checkpoint create c
    run qbk-checkpoint check
    [ "$status" -eq 0 ]
    fails 3 "disk 'disk1' has no checkpoint 'b'" qbk-checkpoint since b --disk disk1
}

@test "offline: the images of a stopped VM give the same view, and changes persist" {
    start_vm
    qbk-checkpoint create a
    guest_write disk0 0 192k
    qbk-checkpoint create b
    guest_write disk1 0 64k
    online=$(qbk-checkpoint list --json | jq -c '[.checkpoints[] | {name, seq, bitmap,
        disks: [.disks[] | {dirty_bytes, granularity, recording, persistent, inconsistent}]}]')
    stop_vm
    run qbk-checkpoint --image "$T/disk1.qcow2" --image "$T/disk0.qcow2" list --json
    [ "$status" -eq 0 ]
    offline=$(jq -c '[.checkpoints[] | {name, seq, bitmap,
        disks: [.disks[] | {dirty_bytes, granularity, recording, persistent, inconsistent}]}]' <<<"$output")
    [ "$offline" = "$online" ]
    # Offline changes are written back to the images.
    qbk-checkpoint --image "$T/disk0.qcow2" --image "$T/disk1.qcow2" delete b
    qbk-checkpoint --image "$T/disk0.qcow2" --image "$T/disk1.qcow2" create c
    launch_vm
    # seq 2 is free again: the VM alone holds the sequence
    [ "$(bitmap_names disk0 | tr '\n' ' ')" = "qbk-000001-a qbk-000002-c " ]
    [ "$(ckpt_count a disk0)" -eq 196608 ]
    [ "$(ckpt_count a disk1)" -eq 65536 ]
    [ "$(bitmap_field disk0 qbk-000001-a recording)" = false ]
    [ "$(bitmap_field disk0 qbk-000002-c recording)" = true ]
}

@test "offline: an image in use by a running VM is refused" {
    start_vm
    fails 1 "lock" qbk-checkpoint --image "$T/disk0.qcow2" list
}

@test "offline: a missing image is a one-line error" {
    fails 1 "nope.qcow2" qbk-checkpoint --image "$T/nope.qcow2" list
}

@test "tcp: the QMP socket may be tcp:HOST:PORT" {
    port=$(free_port)
    start_vm -qmp "tcp:127.0.0.1:$port,server=on,wait=off"
    run qbk-checkpoint --qmp "tcp:127.0.0.1:$port" create a
    [ "$status" -eq 0 ]
    [ "$(bitmap_names disk0)" = "qbk-000001-a" ]
}

@test "bad input: unknown socket" {
    fails 1 "cannot connect" qbk-checkpoint --qmp "$T/none.sock" list
}

@test "bad input: a socket that is not QMP (NBD), and a silent one" {
    make_images
    qemu-nbd --fork --pid-file="$T/nbd.pid" -k "$T/nbd.sock" -f qcow2 "$T/disk0.qcow2"
    run qbk-checkpoint --qmp "$T/nbd.sock" --timeout 3 list
    [ "$status" -eq 1 ]
    assert_one_line_error
    [[ "$output" == *"not"*"QMP"* ]]
    kill "$(cat "$T/nbd.pid")" && wait_gone "$(cat "$T/nbd.pid")"
    # A guest serial port socket accepts and stays silent: bounded wait.
    launch_vm -chardev "socket,id=ser,path=$T/serial.sock,server=on,wait=off" \
        -serial chardev:ser
    fails 1 "no QMP greeting" qbk-checkpoint --qmp "$T/serial.sock" --timeout 1 list
}

@test "bad input: unknown disk, duplicate or odd names, unknown checkpoint" {
    start_vm
    qbk-checkpoint create a
    fails 2 "unknown disk 'nope'" qbk-checkpoint create b --disk nope
    fails 2 "already exists" qbk-checkpoint create a
    for bad in 'semi;colon' 'with space' '-dash' '' "$(printf 'x%.0s' $(seq 65))" 'ünï'; do
        run qbk-checkpoint create "$bad"
        [ "$status" -eq 2 ]
        assert_one_line_error
    done
    run qbk-checkpoint delete nope
    [ "$status" -eq 2 ]
    assert_one_line_error
    run qbk-checkpoint since nope
    [ "$status" -eq 2 ]
    assert_one_line_error
    fails 1 "disk 'disk2' cannot hold checkpoints" qbk-checkpoint create b --disk disk2
    # Nothing changed by any of the above.
    [ "$(bitmap_names disk0)" = "qbk-000001-a" ]
}

@test "bad input: usage errors" {
    run qbk-checkpoint
    [ "$status" -eq 2 ]
    run qbk-checkpoint --qmp x frobnicate
    [ "$status" -eq 2 ]
    assert_one_line_error
    run qbk-checkpoint --qmp x delete
    [ "$status" -eq 2 ]
    run qbk-checkpoint --qmp x list --repair
    [ "$status" -eq 2 ]
    run qbk-checkpoint --qmp x --image y list
    [ "$status" -eq 2 ]
    env -u QBK_QMP qbk-checkpoint list && false
    run qbk-checkpoint --help
    [ "$status" -eq 0 ]
    [[ "$output" == *"Exit status"* ]]
    [[ "$output" == *"Examples"* ]]
    run qbk-checkpoint --version
    [ "$status" -eq 0 ]
    [[ "$output" == "qbk-checkpoint "[0-9]* ]]
}

@test "bad input: a VM without qcow2 disks" {
    qemu-img create -q -f raw "$T/only.raw" 16M
    qemu-system-x86_64 -M q35 -S -display none -nodefaults -no-user-config \
        -qmp "unix:$T/qmp.sock,server=on,wait=off" \
        -drive "file=$T/only.raw,format=raw,if=none,id=d0" \
        -device virtio-blk-pci,drive=d0,id=disk0 \
        -pidfile "$T/qemu.pid" -daemonize
    fails 1 "no disk that can hold checkpoints" qbk-checkpoint create a
}

@test "QEMU gone away: a one-line error, not a crash" {
    start_vm
    kill_vm
    run qbk-checkpoint list
    [ "$status" -eq 1 ]
    assert_one_line_error
}
