#!/usr/bin/env bats
# A real Linux guest (Debian's kernel, busybox, two ext4 disks,
# qemu-guest-agent; tests/guest/build) backed up while it writes: what the
# file systems look like when restored, crash-consistent and quiesced, and
# that a guest qbk froze is always thawed.

bats_require_minimum_version 1.5.0
load helpers
load guest/guest

setup_file() {
    guest_build
}

setup() {
    common_setup
    make_fs_images
    if [[ "$BATS_TEST_DESCRIPTION" == *"reboots"* ]]; then
        GUEST_REBOOTS=1
    fi
    launch_guest
    # files written and fsync'd before any backup, with their checksums
    gsh 'for i in 1 2 3 4 5 6; do
             dd if=/dev/urandom of=/mnt/vda/pre$i bs=64k count=4 conv=fsync 2>/dev/null
         done
         cd /mnt/vda && md5sum pre* >/mnt/vdb/pre.md5 && sync'
}

teardown() {
    guest_shell_stop
    common_teardown
}

# start_writer: the guest writes on both disks until the test ends, each
# file fsync'd, a counter on disk1 after each. Returns once the counter
# is durable: a rename reaches the disk with the next fsync there, so a
# point in time taken before the writer's second round may hold no
# counter at all (a true crash state, but nothing to check against).
start_writer() {
    local i c
    gsh 'i=0; while :; do
             i=$((i + 1))
             dd if=/dev/urandom of=/mnt/vda/w$((i % 40)) bs=4k count=8 conv=fsync 2>/dev/null
             echo $i | dd of=/mnt/vdb/count.new conv=fsync 2>/dev/null
             mv /mnt/vdb/count.new /mnt/vdb/count
         done >/dev/null 2>&1 &'
    for i in $(seq 100); do
        c=$(gsh 'cat /mnt/vdb/count 2>/dev/null') || true
        if [ "${c:-0}" -ge 3 ]; then
            return 0
        fi
        sleep 0.1
    done
    echo "the guest's writer did not get going (counter: '$c')" >&2
    return 1
}

# writes_go_on: the guest's writer counts on (its file systems are not
# frozen), and the agent says thawed.
writes_go_on() {
    local c1 c2
    [ "$(agent guest-fsfreeze-status)" = '"thawed"' ]
    c1=$(gsh cat /mnt/vdb/count)
    sleep 1
    c2=$(gsh cat /mnt/vdb/count)
    echo "writer: $c1 -> $c2"
    [ "$c2" -gt "$c1" ]
}

# pre_files_exact IMAGE0 IMAGE1: the files fsync'd before the backups are
# in the restored disk0 with the checksums the guest wrote on disk1.
pre_files_exact() {
    local d
    d=$(mktemp -d "$T/files.XXXXXX")
    debugfs -R "dump /pre.md5 $d/pre.md5" "$2" >/dev/null 2>&1
    for i in 1 2 3 4 5 6; do
        debugfs -R "dump /pre$i $d/pre$i" "$1" >/dev/null 2>&1
    done
    (cd "$d" && md5sum -c pre.md5)
}

@test "--quiesce: frozen only around the point in time; restores need no journal replay, hold every file, and the guest writes on" {
    start_writer
    qbk-pull --repo "$T/repo" --quiesce --json >"$T/full.json"
    [ "$(jq -r .consistency "$T/full.json")" = application ]
    [ "$(jq -r .quiesce.filesystems "$T/full.json")" -eq 2 ]
    jq -e '.quiesce.frozen_ms > 0 and .quiesce.freezing_ms <= .quiesce.frozen_ms' "$T/full.json"
    echo "frozen for $(jq .quiesce.frozen_ms "$T/full.json") ms"
    writes_go_on
    # the incremental, slowed: during the copy the guest is thawed and the
    # agent free for others
    start_pull inc --quiesce --rate-limit 512K --json
    wait_fleeced "$T/progress-inc" "$PULL_PID"
    [ "$(agent guest-fsfreeze-status)" = '"thawed"' ]
    kill -0 "$PULL_PID"
    wait "$PULL_PID" || { cat "$T"/pull-*.err; false; }
    cp "$T/pull-inc.json" "$T/inc.json"
    [ "$(jq -r '.disks[0].mode' "$T/inc.json")" = incremental ]
    [ "$(jq -r .consistency "$T/inc.json")" = application ]
    writes_go_on
    for b in full inc; do
        id=$(jq -r .id "$T/$b.json")
        img0=$(restored_fs "$id" disk0)
        img1=$(restored_fs "$id" disk1)
        # clean as if unmounted: nothing in the journal to replay
        journal_clean "$img0"
        journal_clean "$img1"
        e2fsck -fn "$img0"
        e2fsck -fn "$img1"
        pre_files_exact "$img0" "$img1"
    done
    assert_clean
}

@test "crash-consistent (no --quiesce): the journal replays, every file fsync'd before is there, both disks at one instant" {
    start_writer
    qbk-pull --repo "$T/repo" --json >"$T/full.json"
    [ "$(jq -r .consistency "$T/full.json")" = crash ]
    [ "$(jq -r .quiesce "$T/full.json")" = null ]
    gsh 'echo more >/mnt/vdb/marker && sync'
    qbk-pull --repo "$T/repo" --json >"$T/inc.json"
    for b in full inc; do
        id=$(jq -r .id "$T/$b.json")
        img0=$(restored_fs "$id" disk0)
        img1=$(restored_fs "$id" disk1)
        # mounted and written: a crash image needs its journal replayed
        needs_recovery "$img0"
        run e2fsck -fy "$img0"
        [ "$status" -le 1 ]
        run e2fsck -fy "$img1"
        [ "$status" -le 1 ]
        e2fsck -fn "$img0"
        e2fsck -fn "$img1"
        pre_files_exact "$img0" "$img1"
        # the counter on disk1 names a file on disk0 written before it
        # (fsync'd first): disk1 can never be ahead of disk0
        n=$(debugfs -R "cat /count" "$img1" 2>/dev/null)
        [ -n "$n" ]
        debugfs -R "stat /w$((n % 40))" "$img0" 2>/dev/null | grep -q "Size: 32768"
    done
    writes_go_on
    assert_clean
}

@test "killed while the guest is frozen: check names it (exit 4), the next qbk-pull thaws it first" {
    start_writer
    QBK_CRASH_AT=frozen run qbk-pull --repo "$T/repo" --quiesce
    [ "$status" -eq 99 ]
    [ "$(agent guest-fsfreeze-status)" = '"frozen"' ]
    run qbk-checkpoint check
    echo "$output"
    [ "$status" -eq 4 ]
    [[ "$output" == *"file systems perhaps still frozen"* ]]
    # still frozen: check alone changes nothing
    [ "$(agent guest-fsfreeze-status)" = '"frozen"' ]
    qbk-pull --repo "$T/repo" --quiesce --json >"$T/next.json"
    [ "$(jq -r .consistency "$T/next.json")" = application ]
    writes_go_on
    id=$(jq -r .id "$T/next.json")
    img0=$(restored_fs "$id" disk0)
    journal_clean "$img0"
    e2fsck -fn "$img0"
    assert_clean
}

@test "killed while frozen, then check --repair: thawed, nothing of the backup left" {
    QBK_CRASH_AT=frozen run qbk-pull --repo "$T/repo" --quiesce --guest-agent "$T/ga.sock"
    [ "$status" -eq 99 ]
    [ "$(agent guest-fsfreeze-status)" = '"frozen"' ]
    run qbk-checkpoint check --repair
    echo "$output"
    [ "$(agent guest-fsfreeze-status)" = '"thawed"' ]
    run -0 qbk-checkpoint check
    gsh 'echo after >/mnt/vda/after && sync'
    # the next backup (it also removes the killed run's scratch directory)
    qbk-pull --repo "$T/repo" --quiesce --json >"$T/next.json"
    img0=$(restored_fs "$(jq -r .id "$T/next.json")" disk0)
    [ "$(debugfs -R "cat /after" "$img0" 2>/dev/null)" = after ]
    assert_clean
}

@test "the guest powers off mid-backup: the backup completes, exact and clean, then QEMU exits as it would have" {
    start_writer
    pid=$(cat "$T/qemu.pid")
    start_pull off --rate-limit 2M --json
    wait_fleeced "$T/progress-off" "$PULL_PID"
    gsend 'sync; poweroff -f'
    wait "$PULL_PID" || { cat "$T"/pull-*.err; false; }
    [ "$(jq -r .status "$T/pull-off.json")" = complete ]
    [ "$(jq -r .guest_powered_off "$T/pull-off.json")" = true ]
    # the poweroff, carried out once the backup was done
    wait_gone "$pid"
    id=$(jq -r .id "$T/pull-off.json")
    img0=$(restored_fs "$id" disk0)
    img1=$(restored_fs "$id" disk1)
    run e2fsck -fy "$img0"
    [ "$status" -le 1 ]
    e2fsck -fn "$img0"
    pre_files_exact "$img0" "$img1"
    # nothing of the backup left (QEMU is gone: its side went with it)
    [ -z "$(ls -A "$T/repo/.scratch")" ]
    assert_no_private_dirs
}

@test "the guest reboots mid-backup: the backup completes and the guest comes back up" {
    start_writer
    start_pull reboot --rate-limit 2M --json
    wait_fleeced "$T/progress-reboot" "$PULL_PID"
    gsend 'sync; reboot -f'
    wait "$PULL_PID" || { cat "$T"/pull-*.err; false; }
    [ "$(jq -r .status "$T/pull-reboot.json")" = complete ]
    [ "$(jq -r .guest_powered_off "$T/pull-reboot.json")" = false ]
    guest_wait_up 2
    [ "$(qmp query-status | jq -r .status)" = running ]
    id=$(jq -r .id "$T/pull-reboot.json")
    img0=$(restored_fs "$id" disk0)
    img1=$(restored_fs "$id" disk1)
    run e2fsck -fy "$img0"
    [ "$status" -le 1 ]
    pre_files_exact "$img0" "$img1"
    assert_clean
}

@test "a poweroff while a killed backup held it: check --repair puts the action back and carries the poweroff out" {
    pid=$(cat "$T/qemu.pid")
    start_pull held --rate-limit 1M
    wait_fleeced "$T/progress-held" "$PULL_PID"
    kill -KILL "$PULL_PID"
    wait "$PULL_PID" || true
    gsend 'sync; poweroff -f'
    for i in $(seq 100); do
        [ "$(qmp query-status | jq -r .status)" = shutdown ] && break
        sleep 0.1
    done
    # held: QEMU waits, the disks intact
    [ "$(qmp query-status | jq -r .status)" = shutdown ]
    run qbk-checkpoint check --json
    [ "$status" -eq 4 ]
    [ "$(jq -r '.leftovers[0].shutdown_action_to_restore' <<<"$output")" = poweroff ]
    run qbk-checkpoint check --repair
    echo "$output"
    [ "$status" -eq 0 ]
    [[ "$output" == *"QEMU has now exited, as it would have then"* ]]
    wait_gone "$pid"
    # the killed run's private directory went with the repair
    assert_no_private_dirs
}

@test "a discard storm (fstrim) between backups: the next incremental reads no more than what changed" {
    # 48 MiB written and deleted before the full: free space, still allocated
    gsh 'dd if=/dev/urandom of=/mnt/vda/big bs=1M count=48 conv=fsync 2>/dev/null
         rm /mnt/vda/big && sync'
    qbk-pull --repo "$T/repo" --json >"$T/full.json"
    # the storm: every free block of both file systems discarded
    gsh 'fstrim -v /mnt/vda; fstrim -v /mnt/vdb'
    gsh 'echo changed >/mnt/vda/small && sync'
    qbk-pull --repo "$T/repo" --json >"$T/inc.json"
    [ "$(jq -r '.disks[0].mode' "$T/inc.json")" = incremental ]
    jq -c '.disks[] | {disk, bytes_read, bytes_zero, bytes_skipped}' "$T/inc.json"
    # the bitmap marks the trimmed ranges dirty, but they read as zeros:
    # no data is read or written for them
    [ "$(jq '.disks[0].bytes_zero' "$T/inc.json")" -ge $((40 << 20)) ]
    [ "$(jq '.disks[0].bytes_read' "$T/inc.json")" -lt $((4 << 20)) ]
    inc0=$T/repo/$(jq -r '.disks[0].image' "$T/inc.json")
    [ "$(stat -c %s "$inc0")" -lt $((8 << 20)) ]
    # and the point in time is exact: the trimmed space reads as zeros
    img0=$(restored_fs "$(jq -r .id "$T/inc.json")" disk0)
    e2fsck -fn "$img0" || [ $? -le 1 ]
    [ "$(debugfs -R "cat /small" "$img0" 2>/dev/null)" = changed ]
    pre_files_exact "$img0" "$(restored_fs "$(jq -r .id "$T/inc.json")" disk1)"
    assert_clean
}

@test "a failure or a signal while the guest is frozen: thawed, rolled back, the next backup incremental and exact" {
    start_writer
    qbk-pull --repo "$T/repo" --json >"$T/full.json"
    before=$(qbk-checkpoint list --json | jq -c '[.checkpoints[].name]')
    # the fleece point fails while frozen
    QBK_FAIL_AT=frozen fails 1 "failed on purpose at 'frozen'" qbk-pull --repo "$T/repo" --quiesce
    writes_go_on
    [ "$(qbk-checkpoint list --json | jq -c '[.checkpoints[].name]')" = "$before" ]
    # SIGTERM while frozen (held 2 s there): the thaw comes first
    QBK_SLOW_AT=frozen qbk-pull --repo "$T/repo" --quiesce 2>"$T/term.err" &
    pid=$!
    # (the agent serves one client at a time: ask QEMU for the mark)
    for i in $(seq 200); do
        qmp qom-list '{"path": "/objects"}' | jq -e '.[] | select(.name | startswith("qbk-f"))' >/dev/null && break
        sleep 0.05
    done
    sleep 0.5
    kill -TERM "$pid"
    rc=0
    wait "$pid" || rc=$?
    cat "$T/term.err"
    [ "$rc" -eq 1 ]
    grep -q "interrupted by a signal" "$T/term.err"
    writes_go_on
    [ "$(qbk-checkpoint list --json | jq -c '[.checkpoints[].name]')" = "$before" ]
    # nothing lost: the next backup stands on the full
    qbk-pull --repo "$T/repo" --quiesce --json >"$T/next.json"
    [ "$(jq -r '.disks[0].parent' "$T/next.json")" = "$(jq -r .id "$T/full.json")" ]
    img0=$(restored_fs "$(jq -r .id "$T/next.json")" disk0)
    journal_clean "$img0"
    e2fsck -fn "$img0"
    assert_clean
}

@test "--quiesce-mount: only the mount points named are frozen; the others stay crash-consistent" {
    start_writer
    run qbk-pull --repo "$T/repo" --quiesce-mount /mnt/vda
    [ "$status" -eq 2 ]
    assert_one_line_error
    qbk-pull --repo "$T/repo" --quiesce --quiesce-mount /mnt/vda --json >"$T/one.json"
    [ "$(jq -r .quiesce.filesystems "$T/one.json")" -eq 1 ]
    writes_go_on
    id=$(jq -r .id "$T/one.json")
    img0=$(restored_fs "$id" disk0)
    img1=$(restored_fs "$id" disk1)
    journal_clean "$img0"
    needs_recovery "$img1"
    e2fsck -fn "$img0"
    # a mount point the guest does not have: refused by the agent, thawed
    run qbk-pull --repo "$T/repo" --quiesce --quiesce-mount /nowhere
    echo "$output"
    [ "$status" -eq 1 ]
    assert_one_line_error
    [[ "$output" == *"could not freeze"* ]]
    writes_go_on
    assert_clean
}
