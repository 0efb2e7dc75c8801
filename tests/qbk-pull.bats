#!/usr/bin/env bats
# qbk-pull and qbk-restore against a real QEMU with the guest writing
# during every copy. Correctness is the shadow model (helpers.bash): each
# backup, restored, equals byte for byte what the disks held at its
# fleece point.

bats_require_minimum_version 1.5.0
load helpers

setup() {
    common_setup
    if [[ "$BATS_TEST_DESCRIPTION" == *"UEFI"* ]]; then
        # firmware code (read-only) and a variable store, as OVMF has them
        head -c $((2 << 20)) /dev/urandom >"$T/code.fd"
        head -c $((256 << 10)) /dev/urandom >"$T/vars.fd"
        start_vm -drive "if=pflash,format=raw,unit=0,file=$T/code.fd,readonly=on" \
            -drive "if=pflash,format=raw,unit=1,file=$T/vars.fd"
    elif [[ "$BATS_TEST_DESCRIPTION" == *"guest agent on TCP"* ]]; then
        AGENT_PORT=$(free_port)
        start_vm -device virtio-serial-pci,id=vser0 \
            -chardev "socket,id=ga0,host=127.0.0.1,port=$AGENT_PORT,server=on,wait=off" \
            -device virtserialport,chardev=ga0,name=org.qemu.guest_agent.0
    elif [[ "$BATS_TEST_DESCRIPTION" == *"silent guest agent"* ]]; then
        # the agent's channel, with no agent behind it (no guest OS)
        start_vm -device virtio-serial-pci,id=vser0 \
            -chardev "socket,id=ga0,path=$T/ga.sock,server=on,wait=off" \
            -device virtserialport,chardev=ga0,name=org.qemu.guest_agent.0
    else
        start_vm
    fi
    shadow_init disk0 disk1
    gw disk0 0 1048576 17
    gw disk0 $((20 << 20)) 3145728 34
    gw disk1 $((5 << 20)) 2097152 51
}

teardown() {
    if mountpoint -q "$T/small" 2>/dev/null; then
        umount "$T/small"
    fi
    common_teardown
}

@test "full, then 3 incrementals: each restore equals its point in time" {
    pull_with_writes full "disk0 disk1"
    [ "$(manifest_field full disk0 mode)" = full ]
    [ "$(manifest_field full disk1 mode)" = full ]
    restore_matches full disk0
    restore_matches full disk1
    assert_clean

    for n in 1 2 3; do
        random_writes 4 disk0 disk1
        pull_with_writes inc$n "disk0 disk1"
        [ "$(manifest_field inc$n disk0 mode)" = incremental ]
        [ "$(manifest_field inc$n disk1 mode)" = incremental ]
        restore_matches inc$n disk0
        restore_matches inc$n disk1
        assert_clean
    done
    # An incremental copies only what changed: far less than the disk.
    [ "$(manifest_field inc2 disk0 bytes_copied)" -lt $((8 << 20)) ]
    [ "$(manifest_field inc2 disk0 parent)" = "$(jq -r .id "$T/pull-inc1.json")" ]
    # Every earlier backup still restores to its own point in time.
    for name in full inc1 inc2; do
        restore_matches $name disk0
        restore_matches $name disk1
    done
    # The chain is stock qcow2 with relative backing files.
    img=$T/repo/$(manifest_field inc3 disk0 image)
    [ "$(qemu-img info --output=json --backing-chain "$img" | jq length)" -eq 4 ]
    [[ "$(qemu-img info --output=json "$img" | jq -r '."backing-filename"')" != /* ]]
    assert_clean
}

@test "the notice knobs for benchmarks (--x-notice-radius, --x-notice-ms): bounds checked; backups with the narrowest and the widest are exact" {
    fails 2 "--x-notice-ms must be 1 to 10000" qbk-pull --repo "$T/repo" --x-notice-ms 0
    fails 2 "--x-notice-radius must be 0 to" qbk-pull --repo "$T/repo" --x-notice-radius -1
    [ ! -e "$T/repo" ]
    pull_with_writes narrow "disk0 disk1" --x-notice-radius 0 --x-notice-ms 1
    restore_matches narrow disk0
    restore_matches narrow disk1
    random_writes 4 disk0 disk1
    pull_with_writes wide "disk0 disk1" --mode full --x-notice-radius $((1 << 40))
    restore_matches wide disk0
    restore_matches wide disk1
    assert_clean
}

@test "differential and --since: each stands on the backup asked for; all restore exactly" {
    backup_chain 2 4
    random_writes 4 disk0 disk1
    pull_with_writes diff "disk0 disk1" --mode differential
    [ "$(manifest_field diff disk0 mode)" = differential ]
    [ "$(manifest_field diff disk0 parent)" = "$FULL" ]
    [ "$(manifest_field diff disk1 parent)" = "$FULL" ]
    restore_matches diff disk0
    restore_matches diff disk1

    random_writes 4 disk0 disk1
    pull_with_writes since "disk0 disk1" --since "$INC1"
    [ "$(manifest_field since disk0 mode)" = incremental ]
    [ "$(manifest_field since disk1 parent)" = "$INC1" ]
    restore_matches since disk0
    restore_matches since disk1

    # what came before is untouched by either
    for name in full inc1 inc2; do
        restore_matches $name disk0
        restore_matches $name disk1
    done
    assert_clean
}

@test "the manifest reports each disk; --json prints it and nothing else" {
    run --separate-stderr qbk-pull --repo "$T/repo" --json
    [ "$status" -eq 0 ]
    m=$output
    [ "$(jq -r .status <<<"$m")" = complete ]
    [ "$(jq -r '.disks | length' <<<"$m")" -eq 3 ]   # the raw disk too
    for f in mode image bytes_copied bytes_skipped bytes_zero seconds throughput_mib_s; do
        [ "$(jq -r --arg f $f '.disks[] | select(.disk=="disk0") | .[$f]' <<<"$m")" != null ]
    done
    [ "$(jq -r '.disks[] | select(.disk=="disk0") | .bytes_copied' <<<"$m")" -eq $((4 << 20)) ]
    [ "$(jq -r '.disks[] | select(.disk=="disk2") | .reason' <<<"$m")" = \
      "no checkpoints on this disk (raw image: only qcow2 can hold persistent bitmaps)" ]
    [ "$(jq -r '.disks[] | select(.disk=="disk0") | .checksum.algorithm' <<<"$m")" = xxh3-128-data-blocks-64k ]
    cmp <(jq -S . <<<"$m") <(jq -S . "$T/repo/backups/$(jq -r .id <<<"$m").json")
    # The raw disk is backed up in full every time.
    run --separate-stderr qbk-pull --repo "$T/repo" --json
    [ "$(jq -r '.disks[] | select(.disk=="disk2") | .mode' <<<"$output")" = full ]
    [ "$(jq -r '.disks[] | select(.disk=="disk0") | .mode' <<<"$output")" = incremental ]
}

@test "SIGKILL mid-copy: the next run cleans up, rolls back, and its backup is exact" {
    pull_with_writes full "disk0 disk1"
    ckpts_before=$(qbk-checkpoint list --json | jq -c '[.checkpoints[].bitmap]')
    random_writes 4 disk0 disk1
    start_pull killed --rate-limit 1M
    pid=$PULL_PID
    wait_fleeced "$T/progress-killed" "$pid"
    random_writes 3 disk0 disk1
    kill -KILL "$pid"
    wait "$pid" || true
    # What it left: fleecing nodes in QEMU and a partial manifest.
    [ "$(qmp query-named-block-nodes '{"flat": true}' |
        jq '[.[] | select(."node-name" | startswith("qbk-"))] | length')" -gt 0 ]
    ls "$T"/repo/backups/*.partial.json
    random_writes 3 disk0 disk1
    pull_with_writes after "disk0 disk1"
    [ "$(manifest_field after disk0 mode)" = incremental ]
    restore_matches after disk0
    restore_matches after disk1
    [ "$(jq -r .status "$T"/repo/backups/*.partial.json)" = failed ]
    # the killed backup's checkpoint was merged away, the new one added
    [ "$(qbk-checkpoint list --json | jq -c '[.checkpoints[].bitmap][:1]')" = "$ckpts_before" ]
    [ "$(qbk-checkpoint list --json | jq '.checkpoints | length')" -eq 2 ]
    assert_clean
}

@test "SIGINT mid-copy: rolled back at once, nothing left, next backup exact" {
    pull_with_writes full "disk0 disk1"
    list_before=$(qbk-checkpoint list --json | jq -c '[.checkpoints[] | .bitmap]')
    random_writes 4 disk0 disk1
    start_pull int --rate-limit 1M --quiet
    pid=$PULL_PID
    wait_fleeced "$T/progress-int" "$pid"
    random_writes 2 disk0 disk1
    kill -INT "$pid"
    rc=0
    wait "$pid" || rc=$?
    [ "$rc" -eq 1 ]
    grep -q "interrupted" "$T/pull-int.err"
    [ "$(wc -l <"$T/pull-int.err")" -eq 1 ]
    assert_clean
    [ "$(qbk-checkpoint list --json | jq -c '[.checkpoints[] | .bitmap]')" = "$list_before" ]
    [ "$(jq -r .status "$T"/repo/backups/*.partial.json)" = failed ]
    [ "$(ls "$T"/repo/disks/disk0 | wc -l)" -eq 2 ]   # full's image + digests
    random_writes 2 disk0 disk1
    pull_with_writes after "disk0 disk1"
    restore_matches after disk0
    restore_matches after disk1
}

@test "the target daemon dies mid-copy: clean failure and rollback" {
    pull_with_writes full "disk0 disk1"
    start_pull kill --mode full --rate-limit 1M --quiet
    pid=$PULL_PID
    wait_fleeced "$T/progress-kill" "$pid"
    sleep 0.3
    # this test's own target daemon only (its images are in $T/repo, its
    # sockets in TMPDIR=$T/tmp): never another run's daemons
    pkill -KILL -f "qemu-storage-daemon.*($T/repo|$T/tmp)"
    rc=0
    wait "$pid" || rc=$?
    [ "$rc" -eq 1 ]
    [ "$(wc -l <"$T/pull-kill.err")" -eq 1 ]
    assert_clean
    random_writes 2 disk0 disk1
    pull_with_writes after "disk0 disk1"
    [ "$(manifest_field after disk0 mode)" = incremental ]
    restore_matches after disk0
}

@test "a full target disk (tiny tmpfs): one-line error, rollback, nothing lost" {
    mkdir "$T/small"
    mount -t tmpfs -o size=6m tmpfs "$T/small" 2>/dev/null || skip "cannot mount tmpfs here"
    run qbk-pull --repo "$T/small/repo" --scratch-dir "$T/scratch"
    [ "$status" -eq 1 ]
    assert_one_line_error
    [[ "$output" == *"No space left on device"* ]] || [[ "$output" == *"ENOSPC"* ]] ||
        [[ "$output" == *"space"* ]]
    [ "$(qmp query-jobs | jq length)" -eq 0 ]
    [ "$(qmp query-block-exports | jq length)" -eq 0 ]
    [ -z "$(ls -A "$T/scratch")" ]
    [ "$(qbk-checkpoint list --json | jq '.checkpoints | length')" -eq 0 ]
    [ "$(jq -r .status "$T"/small/repo/backups/*.partial.json)" = failed ]
}

@test "a full output disk for qbk-restore (tiny tmpfs): one line that names the output, exit 1, nothing left there" {
    guest_write disk0 0 $((4 << 20)) 0x33
    run -0 qbk-pull --repo "$T/repo" --mode full --quiet
    mkdir "$T/small"
    mount -t tmpfs -o size=1m tmpfs "$T/small" 2>/dev/null || skip "cannot mount tmpfs here"
    run qbk-restore --repo "$T/repo" --disk disk0 -o "$T/small/disk0.raw"
    left=$(ls -A "$T/small")
    umount "$T/small"
    [ "$status" -eq 1 ]
    assert_one_line_error
    [[ "$output" == *"cannot write '$T/small/disk0.raw'"* ]]
    [[ "$output" == *"space"* ]]
    [ -z "$left" ]
}

@test "QEMU killed mid-backup: error; after restart, auto takes full backups" {
    pull_with_writes full "disk0 disk1"
    start_pull crash --rate-limit 1M --quiet
    pid=$PULL_PID
    wait_fleeced "$T/progress-crash" "$pid"
    kill_vm
    rc=0
    wait "$pid" || rc=$?
    [ "$rc" -eq 1 ]
    [ "$(wc -l <"$T/pull-crash.err")" -eq 1 ]
    launch_vm
    shadow_from_images disk0 disk1
    pull_with_writes after "disk0 disk1"
    [ "$(manifest_field after disk0 mode)" = full ]
    [[ "$(manifest_field after disk0 reason)" == *"checkpoint"* ]]
    restore_matches after disk0
    restore_matches after disk1
    assert_clean
}

@test "a missing bitmap on one disk: auto goes full there only; --mode incremental refuses" {
    pull_with_writes full "disk0 disk1"
    bitmap=$(jq -r .checkpoint_bitmap "$T/pull-full.json")
    qmp block-dirty-bitmap-remove "{\"node\": \"$(node_of disk1)\", \"name\": \"$bitmap\"}"
    random_writes 3 disk0 disk1
    run qbk-pull --repo "$T/repo" --mode incremental
    [ "$status" -eq 3 ]
    assert_one_line_error
    [[ "$output" == *"disk 'disk1'"*"full backup is needed"* ]]
    assert_clean
    pull_with_writes auto "disk0 disk1"
    [ "$(manifest_field auto disk0 mode)" = incremental ]
    [ "$(manifest_field auto disk1 mode)" = full ]
    restore_matches auto disk0
    restore_matches auto disk1
}

@test "a resized disk gets a full backup" {
    pull_with_writes full "disk0 disk1"
    qmp block_resize "{\"node-name\": \"disk0-fmt\", \"size\": $((96 << 20))}"
    truncate -s 96M "$T/shadow-disk0.raw"
    gw disk0 $((80 << 20)) 65536 99
    pull_with_writes grown "disk0 disk1"
    [ "$(manifest_field grown disk0 mode)" = full ]
    [ "$(manifest_field grown disk1 mode)" = incremental ]
    restore_matches grown disk0
    restore_matches grown disk1
}

@test "one qbk-pull at a time per repository" {
    start_pull first --rate-limit 1M
    pid=$PULL_PID
    wait_fleeced "$T/progress-first" "$pid"
    fails 1 "another qbk-pull" qbk-pull --repo "$T/repo" --qmp "$T/test.sock"
    kill -INT "$pid"
    wait "$pid" || true
    assert_clean
}

@test "bad input: unknown disk, bad mode, no chain, unknown backup: one-line errors" {
    run qbk-pull --repo "$T/repo" --disk nope
    [ "$status" -eq 2 ]
    assert_one_line_error
    run qbk-pull --repo "$T/repo" --mode sometimes
    [ "$status" -eq 2 ]
    assert_one_line_error
    run qbk-pull --repo "$T/repo" --mode incremental
    [ "$status" -eq 3 ]
    assert_one_line_error
    qbk-pull --repo "$T/repo" >/dev/null
    run qbk-restore --repo "$T/repo" --disk disk0 --backup 19990101T000000Z -o "$T/x.raw"
    [ "$status" -eq 2 ]
    assert_one_line_error
    run qbk-restore --repo "$T/repo" --disk nope -o "$T/x.raw"
    [ "$status" -eq 2 ]
    assert_one_line_error
    [ ! -e "$T/x.raw" ]
    assert_clean
}

@test "a corrupt manifest is left out by name and never built on: the next backup is full" {
    qbk-pull --repo "$T/repo" >/dev/null
    bad=$(ls "$T"/repo/backups/*.json | head -1)
    echo '{"id": ' >"$bad"
    run --separate-stderr qbk-pull --repo "$T/repo" --json
    [ "$status" -eq 0 ]
    [[ "$stderr" == *"warning: left out a damaged manifest: backups/$(basename "$bad") is not valid JSON"* ]]
    [ "$(jq -r '.disks[] | select(.disk == "disk0") | .mode' <<<"$output")" = full ]
    [ "$(jq '.skipped_manifests | length' <<<"$output")" -eq 1 ]
    assert_clean
}

@test "restore detects a damaged backup image" {
    qbk-pull --repo "$T/repo" >/dev/null
    img=$(ls "$T"/repo/disks/disk0/*.qcow2)
    # Change one data byte inside the image (not its metadata): the
    # checksum of the restored disk no longer matches.
    off=$(qemu-img map --output=json "$img" | jq '[.[] | select(.data)][0].offset')
    printf '\xff' | dd of="$img" bs=1 seek=$((off + 100)) conv=notrunc status=none
    fails 1 "does not match" qbk-restore --repo "$T/repo" --disk disk0 -o "$T/x.raw"
}

@test "--export-only: nbdinfo and nbdcopy read the point in time and its bitmap; commit keeps the checkpoint" {
    qbk-checkpoint create base
    gw disk0 $((8 << 20)) 131072 77
    start_export one --since base
    snapshot one disk0
    random_writes 3 disk0            # after the fleece point: not exported
    uri=$(jq -r '.exports[] | select(.disk=="disk0") | .uri' "$T/export-one.json")
    ctx=$(jq -r '.exports[] | select(.disk=="disk0") | .bitmap_context' "$T/export-one.json")
    [[ "$uri" == nbd+unix:///disk0?socket=* ]]
    # The bitmap context marks exactly what was written since "base".
    run nbdinfo --map="$ctx" "$uri"
    [ "$status" -eq 0 ]
    [ "$(awk '$3 == 1 { n += $2 } END { print n }' <<<"$output")" -eq 131072 ]
    [ "$(awk '$3 == 1 { print $1 }' <<<"$output")" -eq $((8 << 20)) ]
    nbdcopy "$uri" "$T/exported.raw"
    cmp "$T/exported.raw" "$T/expect-one-disk0.raw"
    echo commit >&7
    exec 7>&-
    wait "$EXPORT_PID"
    [ "$(qmp query-block-exports | jq length)" -eq 0 ]
    [ "$(qmp query-jobs | jq length)" -eq 0 ]
    [ "$(qbk-checkpoint list --json | jq '.checkpoints | length')" -eq 2 ]
    [ -z "$(bitmap_names disk0 | grep since)" ]
    assert_clean
}

@test "--export-only: EOF on stdin or a signal rolls everything back" {
    qbk-checkpoint create base
    start_export abort --since base
    exec 7>&-                       # EOF: abort
    rc=0
    wait "$EXPORT_PID" || rc=$?
    [ "$rc" -eq 1 ]
    grep -q "aborted" "$T/export-abort.err"
    [ "$(bitmap_names disk0)" = "qbk-000001-base" ]
    [ "$(bitmap_field disk0 qbk-000001-base recording)" = true ]
    assert_clean
    start_export term
    kill -TERM "$EXPORT_PID"
    rc=0
    wait "$EXPORT_PID" || rc=$?
    exec 7>&-
    [ "$rc" -eq 1 ]
    [ "$(bitmap_names disk0)" = "qbk-000001-base" ]
    assert_clean
}

@test "--format raw: a sparse raw full (libaio, both write modes), then qcow2 incrementals on it" {
    # an odd size: the last O_DIRECT write is padded, the file cut back
    odd=$(( (64 << 20) + 4608 ))
    qmp block_resize "{\"node-name\": \"disk0-fmt\", \"size\": $odd}"
    truncate -s "$odd" "$T/shadow-disk0.raw"
    gw disk0 $((odd - 4608)) 4608 88
    pull_with_writes full "disk0 disk1" --format raw
    [ "$(manifest_field full disk0 format)" = raw ]
    img=$T/repo/$(manifest_field full disk0 image)
    [[ "$img" == *.raw ]]
    [ "$(stat -c %s "$img")" -eq "$odd" ]
    # sparse: the holes of the disk are holes in the file
    [ "$(du -k "$img" | cut -f1)" -lt $((16 * 1024)) ]
    restore_matches full disk0
    restore_matches full disk1
    random_writes 4 disk0 disk1
    pull_with_writes inc "disk0 disk1" --format raw
    [ "$(manifest_field inc disk0 format)" = qcow2 ]
    inc=$T/repo/$(manifest_field inc disk0 image)
    [ "$(qemu-img info --output=json "$inc" | jq -r '."backing-filename-format"')" = raw ]
    restore_matches inc disk0
    restore_matches inc disk1
    # the same odd-sized full written with O_DIRECT (padded, cut back)
    random_writes 4 disk0 disk1
    pull_with_writes direct "disk0 disk1" --format raw --mode full --write-mode direct \
        --requests 5 --connections 1 --chunk-size 131072
    [ "$(stat -c %s "$T/repo/$(manifest_field direct disk0 image)")" -eq "$odd" ]
    # the copier ran as asked, and the manifest says so
    [ "$(manifest_field full disk0 copier | jq -r .write_mode)" = cached ]
    [ "$(manifest_field inc disk0 copier | jq -r .write_mode)" = null ]
    [ "$(manifest_field direct disk0 copier | jq -c '[.write_mode, .requests, .connections, .chunk_size]')" = '["direct",5,1,131072]' ]
    restore_matches direct disk0
    restore_matches direct disk1
    assert_clean
}

@test "an NBD server already running in QEMU is reused with --nbd-server, never stopped" {
    qmp nbd-server-start "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"$T/theirs.sock\"}}}"
    fails 1 "--nbd-server" qbk-pull --repo "$T/repo"
    assert_clean
    pull_with_writes full "disk0 disk1" --nbd-server "$T/theirs.sock"
    restore_matches full disk0
    restore_matches full disk1
    assert_clean
    # theirs still runs
    run qmp nbd-server-start "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"$T/x.sock\"}}}"
    [ "$status" -ne 0 ]
    [[ "$output" == *"already running"* ]]
    [ -S "$T/theirs.sock" ]
}

@test "a backup id never collides with a checkpoint the VM already has" {
    # Another repository's backups of this VM took the names of the next
    # seconds (ids are UTC times): this one must step around them.
    now=$(date -u +%s)
    for s in 0 1 2 3 4 5; do
        qbk-checkpoint create "$(date -u -d "@$((now + s))" +%Y%m%dT%H%M%SZ)" >/dev/null
    done
    qbk-pull --repo "$T/repo" --json >"$T/a.json"
    [[ "$(jq -r .id "$T/a.json")" == *.* ]]
    [ "$(qbk-checkpoint list --json | jq '.checkpoints | length')" -eq 7 ]
    assert_clean
}

@test "killed after its manifest was written: the next run keeps that backup's checkpoint" {
    pull_with_writes full "disk0 disk1"
    id=$(jq -r .id "$T/pull-full.json")
    # As if qbk-pull died between writing the manifest and removing the
    # partial one.
    jq '.status = "in-progress"' "$T/repo/backups/$id.json" >"$T/repo/backups/$id.partial.json"
    random_writes 3 disk0 disk1
    pull_with_writes next "disk0 disk1"
    [ "$(manifest_field next disk0 mode)" = incremental ]
    [ "$(manifest_field next disk0 parent)" = "$id" ]
    [ ! -e "$T/repo/backups/$id.partial.json" ]
    restore_matches full disk0
    restore_matches next disk0
    restore_matches next disk1
    assert_clean
}

@test "--quiesce and no guest agent channel: required fails before anything changes; try is crash-consistent and says so" {
    before=$(qbk-checkpoint list --json | jq -c .)
    fails 1 "--quiesce: no guest agent to quiesce with: the VM has no guest agent channel" qbk-pull --repo "$T/repo" --quiesce
    [ "$(qbk-checkpoint list --json | jq -c .)" = "$before" ]
    [ -z "$(ls "$T/repo/backups" 2>/dev/null)" ]
    fails 2 "--quiesce must be required or try" qbk-pull --repo "$T/repo" --quiesce=sometimes
    # try: a backup all the same, crash-consistent, and it says so
    pull_with_writes try "disk0 disk1" --quiesce=try
    [ "$(jq -r .consistency "$T/pull-try.json")" = crash ]
    [[ "$(jq -r .quiesce.skipped "$T/pull-try.json")" == *"no guest agent channel"* ]]
    grep -q "warning: crash-consistent only" "$T/pull-try.err"
    restore_matches try disk0
    restore_matches try disk1
    assert_clean
}

@test "--quiesce and a silent guest agent: required times out cleanly, VM untouched; try goes on crash-consistent" {
    before=$(qbk-checkpoint list --json | jq -c .)
    # found through QEMU (the channel's socket), and asked: no answer
    fails 1 "no answer from the guest agent at 'unix:$T/ga.sock'" qbk-pull --repo "$T/repo" --quiesce
    [ "$(qbk-checkpoint list --json | jq -c .)" = "$before" ]
    [ "$(qmp qom-list '{"path": "/objects"}' | jq '[.[].name | select(startswith("qbk-"))] | length')" -eq 0 ]
    run qbk-pull --repo "$T/repo" --quiesce --guest-agent "$T/nowhere.sock"
    [ "$status" -eq 1 ]
    [[ "$output" == *"cannot connect to '$T/nowhere.sock'"* ]]
    pull_with_writes try "disk0 disk1" --quiesce=try --guest-agent "$T/ga.sock"
    [ "$(jq -r .consistency "$T/pull-try.json")" = crash ]
    [[ "$(jq -r .quiesce.skipped "$T/pull-try.json")" == *"no answer from the guest agent"* ]]
    restore_matches try disk0
    restore_matches try disk1
    # the agent of a qbk-qmp user: the same one-line error
    run qbk-qmp --agent "$T/ga.sock" --timeout 1 guest-fsfreeze-status
    [ "$status" -eq 1 ]
    assert_one_line_error
    assert_clean
}

@test "UEFI firmware and its variable store (pflash): listed with their roles, backed up in full with the disks, restored exact" {
    run -0 qbk-checkpoint disks --json
    [ "$(jq -r '.disks[] | select(.disk == "pflash0") | .role' <<<"$output")" = firmware ]
    [ "$(jq -r '.disks[] | select(.disk == "pflash1") | .role' <<<"$output")" = firmware-vars ]
    [ "$(jq -r '.disks[] | select(.disk == "disk0") | .role' <<<"$output")" = disk ]
    run -0 qbk-checkpoint disks
    [[ "$output" == *"pflash1"*"firmware-vars"* ]]
    # the firmware writes a variable
    qmp --hmp 'qemu-io pflash1 "write -P 0x42 8192 4096"' >/dev/null
    cp "$T/vars.fd" "$T/vars-1.fd"
    pull_with_writes one "disk0 disk1"
    [ "$(jq -r '.disks[] | select(.disk == "pflash1") | .role' "$T/pull-one.json")" = firmware-vars ]
    [ "$(manifest_field one pflash1 mode)" = full ]
    restore_matches one disk0
    qmp --hmp 'qemu-io pflash1 "write -P 0x43 0 512"' >/dev/null
    cp "$T/vars.fd" "$T/vars-2.fd"
    pull_with_writes two "disk0 disk1"
    # raw: no checkpoints, so in full every time, next to incrementals
    [ "$(manifest_field two pflash1 mode)" = full ]
    [ "$(manifest_field two disk0 mode)" = incremental ]
    for n in 1 2; do
        id=$(jq -r .id "$T/pull-$([ $n = 1 ] && echo one || echo two).json")
        qbk-restore --repo "$T/repo" --backup "$id" --disk pflash1 -o "$T/r$n.fd"
        cmp "$T/r$n.fd" "$T/vars-$n.fd"
    done
    qbk-restore --repo "$T/repo" --disk pflash0 -o "$T/code-r.fd"
    cmp "$T/code-r.fd" "$T/code.fd"
    restore_matches two disk0
    restore_matches two disk1
    assert_clean
}

@test "a silent guest agent on TCP: found through QEMU as tcp:HOST:PORT, asked, a bounded one-line error" {
    run qbk-pull --repo "$T/repo" --quiesce
    echo "$output"
    [ "$status" -eq 1 ]
    assert_one_line_error
    [[ "$output" == *"no answer from the guest agent at 'tcp:127.0.0.1:$AGENT_PORT'"* ]]
    assert_clean
}
