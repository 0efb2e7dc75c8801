#!/usr/bin/env bats
# A repository and a host that are not to be trusted: hostile or damaged
# manifests, journals and images, symbolic links, options out of bounds,
# killed runs, a lax umask, odd directory names. Each test checks the data
# (checksums, files outside the repository untouched) and that nothing of
# qbk's is left behind.

bats_require_minimum_version 1.5.0
load helpers

setup() {
    common_setup
    two_disk_vm
    backup_chain 1 4
    # files outside the repository that nothing may touch
    mkdir "$T/outside"
    head -c 65536 /dev/urandom >"$T/outside/victim.img"
    echo secret >"$T/outside/victim.txt"
    outside_sum=$(outside_state)
}

teardown() {
    common_teardown
}

# Every file outside the repository, with its checksum.
outside_state() {
    (cd "$T/outside" && find . -type f -print0 | sort -z | xargs -0 -r md5sum)
}

assert_outside_untouched() {
    [ "$(outside_state)" = "$outside_sum" ]
}

# A status a command may end with: a documented code, not a crash or hang.
assert_clean_exit() {
    [ "$status" -le 4 ]
}

@test "manifest and journal paths are never followed: nothing outside is deleted or renamed" {
    id=20991231T000000Z
    # a partial manifest of a "killed run" whose files are elsewhere
    jq --arg id $id --arg v "$T/outside/victim.img" --arg t "$T/outside/victim.txt" \
        '.id = $id | .status = "in-progress" | del(.disks[].checksum) |
         .disks[0].image = $v | .disks[0].digests = $t |
         .nbd_server_socket = $t | .scratch_dir = "'"$T/outside"'"' \
        "$T/repo/backups/$FULL.json" >"$T/repo/backups/$id.partial.json"
    # a journal of the first qbk-merge's kind, naming files elsewhere
    jq -n --arg to "$INC1" --arg v "$T/outside/victim.img" --arg t "$T/outside/victim.txt" \
        '{id: $to, disk: "disk0", to: $to, parent: null, format: "qcow2",
          new_image: $v, image: $t, new_digests: $v, digests: $t, drop: []}' \
        >"$T/repo/merge-journal.json"
    run qbk-merge --repo "$T/repo" --keep-daily 1 --dry-run
    echo "$output"
    [ "$status" -eq 1 ]
    [[ "$output" == *"merge journal does not describe a merge"* ]]
    assert_outside_untouched
    run qbk-pull --repo "$T/repo"
    [ "$status" -eq 1 ]
    assert_outside_untouched
    rm "$T/repo/merge-journal.json"
    random_writes 2 disk0 disk1
    pull_with_writes after "disk0 disk1"
    assert_outside_untouched
    [ "$(manifest_field after disk0 mode)" = incremental ]
    restore_matches after disk0
    restore_matches inc1 disk1
    assert_clean
}

@test "a symbolic link in the repository is refused, not followed" {
    mv "$T/repo/disks/disk1" "$T/repo-disk1"
    ln -s "$T/outside" "$T/repo/disks/disk1"
    fails 1 "disks/disk1' is a symbolic link" qbk-pull --repo "$T/repo"
    run qbk-restore --repo "$T/repo" --disk disk0 -o "$T/x.raw"
    [ "$status" -eq 1 ]
    assert_outside_untouched
    rm "$T/repo/disks/disk1"
    mv "$T/repo-disk1" "$T/repo/disks/disk1"
    # a manifest that is a link is left out, by name
    ln -s /etc/passwd "$T/repo/backups/20991231T000000Z.json"
    run --separate-stderr qbk-restore --repo "$T/repo" --list
    [ "$status" -eq 0 ]
    [[ "$stderr" == *"skipped backups/20991231T000000Z.json"*"symbolic link"* ]]
    [ "$(wc -l <<<"$output")" -eq 2 ]
    assert_clean
}

@test "an image re-pointed at a host file: restore, --into, verify and merge refuse; no output left" {
    head -c $((64 << 20)) /dev/urandom >"$T/outside/host.raw"
    outside_sum=$(outside_state)
    img=$T/repo/disks/disk0/$INC1.qcow2
    qemu-img rebase -u -f qcow2 -b "$T/outside/host.raw" -F raw "$img"
    fails 1 "names backing file '$T/outside/host.raw' where the manifest says '$FULL.qcow2'" qbk-restore --repo "$T/repo" --disk disk0 --backup "$INC1" -o "$T/out.raw"
    [ ! -e "$T/out.raw" ]
    [ -z "$(ls -A "$T" | grep '\.qbk-')" ]
    qbk-restore --repo "$T/repo" --disk disk0 --backup "$FULL" -o "$T/into.raw"
    before=$(md5sum <"$T/into.raw")
    run qbk-restore --repo "$T/repo" --disk disk0 --into "$T/into.raw" --from "$FULL" --backup "$INC1"
    [ "$status" -eq 1 ]
    [ "$(md5sum <"$T/into.raw")" = "$before" ]
    run qbk-verify --repo "$T/repo" --backup "$INC1" --disk disk0
    [ "$status" -eq 1 ]
    [[ "$output" == *"FAILED"*"names backing file"* ]]
    run qbk-merge --repo "$T/repo" --disk disk0 --from "$INC1" --to "$INC1" 
    [ "$status" -ne 0 ]
    run qbk-merge --repo "$T/repo" --full-at "$INC1" --disk disk0
    [ "$status" -eq 1 ]
    assert_outside_untouched
    # an image whose backing file names itself: an error, not a loop
    qemu-img rebase -u -f qcow2 -b "$INC1.qcow2" -F qcow2 "$img"
    run timeout 60 qbk-restore --repo "$T/repo" --disk disk0 --backup "$INC1" -o "$T/out.raw"
    [ "$status" -eq 1 ]
    [ ! -e "$T/out.raw" ]
    assert_clean
}

@test "malformed manifests: each command names the file; none crashes, hangs or trusts it" {
    m=$T/repo/backups/$INC1.json
    cp "$m" "$T/good.json"
    for edit in 'del(.disks)' '.disks = null' '.disks = {}' '.disks = "disk0"' \
        'del(.disks[0].disk)' '.disks[0].parent = .id' '.disks[0].size = -5' \
        '.disks[0].image = "../../outside/victim.img"' '.id = "../x"' \
        '.disks[0].checksum = 7'; do
        jq "$edit" "$T/good.json" >"$m"
        for cmd in "qbk-restore --repo $T/repo --disk disk0 --backup $INC1 -o $T/x.raw" \
            "qbk-verify --repo $T/repo" "qbk-restore --repo $T/repo --list" \
            "qbk-merge --repo $T/repo --keep-daily 9 --dry-run"; do
            run timeout 120 $cmd
            echo "$edit | $cmd: $status $output"
            assert_clean_exit
        done
        run timeout 120 qbk-verify --repo "$T/repo"
        [ "$status" -eq 1 ]
        [[ "$output" == *"FAILED: backups/$INC1.json"* ]]
        [ ! -e "$T/x.raw" ]
    done
    # a cycle of parents (each file valid on its own)
    jq --arg p "$INC1" '(.disks[] | select(.disk == "disk0")) |= (.parent = $p |
        .mode = "incremental")' "$T/repo/backups/$FULL.json" >"$T/f.json"
    mv "$T/f.json" "$T/repo/backups/$FULL.json"
    cp "$T/good.json" "$m"
    run timeout 60 qbk-restore --repo "$T/repo" --disk disk0 --backup "$INC1" -o "$T/x.raw"
    [ "$status" -eq 1 ]
    [[ "$output" == *"loops"* ]]
    run --separate-stderr timeout 300 qbk-pull --repo "$T/repo" --json
    [ "$status" -eq 0 ]
    # a chain that loops is no parent: a full backup
    [ "$(jq -r '.disks[] | select(.disk == "disk0") | .mode' <<<"$output")" = full ]
    assert_outside_untouched
    assert_clean
}

@test "damaged parent digests: auto goes full for that disk, an explicit incremental refuses" {
    dig=$T/repo/disks/disk0/$INC1.digests
    printf '\x01' | dd of="$dig" bs=1 seek=100 conv=notrunc status=none
    truncate -s 100 "$T/repo/disks/disk1/$INC1.digests"
    run qbk-pull --repo "$T/repo" --mode incremental
    [ "$status" -eq 3 ]
    [[ "$output" == *"block digests of backup '$INC1' are damaged"* ]]
    random_writes 2 disk0 disk1
    pull_with_writes after "disk0 disk1"
    [ "$(manifest_field after disk0 mode)" = full ]
    [[ "$(manifest_field after disk0 reason)" == *"block digests of backup '$INC1' are damaged"* ]]
    [ "$(manifest_field after disk1 mode)" = full ]
    restore_matches after disk0
    restore_matches after disk1
    qbk-verify --repo "$T/repo" --backup "$(jq -r .id "$T/pull-after.json")"
    assert_clean
}

@test "options out of bounds: a usage error before the VM or the repository is touched" {
    checkpoints=$(qbk-checkpoint list --json | jq -c .)
    for args in "--requests 100000000" "--requests -1" "--timeout 3000000" \
        "--timeout 0" "--rate-limit -5" "--rate-limit 99999999999T" \
        "--rate-limit 0" "--rate-limit 5X" "--guest-latency-target nan" \
        "--guest-latency-target inf" "--guest-latency-target -1" \
        "--chunk-size 1000" "--chunk-size 68719476736" "--connections 9" \
        "--progress-fd 77" "--node x=a/b" "--node x=../y" "--disk a/b" \
        "--scratch-dir="; do
        run qbk-pull --repo "$T/new" $args
        echo "$args: $output"
        [ "$status" -eq 2 ]
        assert_one_line_error
        [ ! -e "$T/new" ]
    done
    run qbk-pull --repo "" --qmp "$QBK_QMP"
    [ "$status" -eq 2 ]
    for args in "--keep-daily -1" "--keep-weekly -7 --dry-run" "--full-at ../x" \
        "--from a/b --to c"; do
        run qbk-merge --repo "$T/repo" $args
        echo "$args: $output"
        [ "$status" -eq 2 ]
        assert_one_line_error
    done
    run qbk-restore --repo "$T/repo" --disk ../disk0 -o "$T/x.raw"
    [ "$status" -eq 2 ]
    run qbk-copy --requests 5000 x y
    [ "$status" -eq 2 ]
    run qbk-checkpoint --timeout 99999999 list
    [ "$status" -eq 2 ]
    [ "$(qbk-checkpoint list --json | jq -c .)" = "$checkpoints" ]
    assert_clean
}

@test "owner-only whatever the umask: repository, scratch, private dirs and restores" {
    umask 022
    mkfifo "$T/ctl"
    qbk-pull --repo "$T/repo" --export-only --json <"$T/ctl" >"$T/exp.json" 2>"$T/exp.err" &
    pid=$!
    exec 5>"$T/ctl"
    wait_for 30 test -s "$T/exp.json"
    # while it is at work: its scratch and sockets are private
    [ -z "$(find "$T/repo" "$T/tmp" -mindepth 1 \( -type d ! -perm 0700 \) -o \
        \( -type f -perm /077 \))" ]
    [ -n "$(find "$T/repo/.scratch" -name '*.scratch')" ]
    echo commit >&5
    exec 5>&-
    wait "$pid"
    random_writes 2 disk0
    pull_with_writes after "disk0 disk1"
    qbk-restore --repo "$T/repo" --disk disk0 -o "$T/r.raw"
    [ "$(stat -c %a "$T/r.raw")" = 600 ]
    [ "$(stat -c %a "$T/repo")" = 700 ]
    [ -z "$(find "$T/repo" -mindepth 1 \( -type d ! -perm 0700 \) -o \
        \( -type f -perm /077 \))" ]
    assert_clean
}

@test "planted links at scratch, digests and manifest names are never written through" {
    # the names an older qbk would have used in the next seconds
    now=$(date -u +%s)
    for s in $(seq 0 20); do
        id=$(date -u -d "@$((now + s))" +%Y%m%dT%H%M%SZ)
        for i in 0 1 2; do
            ln -sf "$T/outside/victim.img" "$T/repo/.scratch/qbk-s$i-$id.scratch.qcow2"
            ln -sf "$T/outside/victim.img" "$T/repo/.scratch/qbk-s$i-$id.scratch"
        done
        ln -sf "$T/outside/victim.txt" "$T/repo/disks/disk0/$id.digests"
        ln -sf "$T/outside/victim.txt" "$T/repo/backups/$id.json.tmp"
        ln -sf "$T/outside/victim.txt" "$T/repo/backups/$id.partial.json.tmp"
    done
    random_writes 2 disk0 disk1
    pull_with_writes after "disk0 disk1"
    restore_matches after disk0
    restore_matches after disk1
    assert_outside_untouched
    find "$T/repo" -type l -delete
    assert_clean
}

@test "odd directory names: a comma, a space and & in TMPDIR and the scratch dir" {
    export TMPDIR="$T/tmp/a,b c&d"
    mkdir -p "$TMPDIR"
    mkdir -p "$T/scr,x y"
    random_writes 2 disk0 disk1
    pull_with_writes after "disk0 disk1" --scratch-dir "$T/scr,x y"
    restore_matches after disk0
    qbk-verify --repo "$T/repo" --backup latest --disk disk1
    # --export-only's URIs are percent-encoded: any NBD client can use them
    mkfifo "$T/ctl"
    qbk-pull --repo "$T/repo" --export-only --json <"$T/ctl" >"$T/exp.json" 2>"$T/exp.err" &
    pid=$!
    exec 5>"$T/ctl"
    wait_for 30 test -s "$T/exp.json"
    uri=$(jq -r '.exports[] | select(.disk == "disk0") | .uri' "$T/exp.json")
    [[ "$uri" == *"%2C"* ]]
    [ "$(nbdinfo --size "$uri")" -eq $((64 << 20)) ]
    echo abort >&5
    exec 5>&-
    wait "$pid" || true
    [ -z "$(ls -A "$TMPDIR")" ]
    export TMPDIR="$T/tmp"
    rmdir "$T/tmp/a,b c&d"
    assert_clean
}

@test "a killed backup: check names it (exit 4), check --repair undoes it as the next run would" {
    before=$(qbk-checkpoint list --json | jq -c '[.checkpoints[].bitmap]')
    random_writes 2 disk0 disk1
    start_pull killed --rate-limit 1M
    wait_fleeced "$T/progress-killed" "$PULL_PID"
    # killed while it copies: every export is up
    wait_copying "$T/progress-killed" "$PULL_PID"
    kill -KILL "$PULL_PID"
    wait "$PULL_PID" || true
    id=$(jq -r .id "$T"/repo/backups/*.partial.json)
    run qbk-checkpoint check
    echo "$output"
    [ "$status" -eq 4 ]
    [[ "$output" == *"backup '$id' was left by a qbk-pull that is gone"* ]]
    [ "$(qmp query-block-exports | jq length)" -gt 0 ]
    # scheme B's exports, one of each per disk: the view, the scratch
    # (notices), the disk's chain
    views=$(qmp query-block-exports | jq '[.[].id | select(startswith("qbk-e"))] | length')
    [ "$views" -gt 0 ]
    for kind in x h; do
        [ "$(qmp query-block-exports | jq --arg k "qbk-$kind" \
            '[.[].id | select(startswith($k))] | length')" -eq "$views" ]
    done
    run qbk-checkpoint check --repair --json
    [ "$status" -eq 0 ]
    [ "$(jq .undone <<<"$output")" -eq 1 ]
    [ "$(jq '.leftovers | length' <<<"$output")" -eq 0 ]
    # exactly as before the killed run: its checkpoint merged back
    [ "$(qbk-checkpoint list --json | jq -c '[.checkpoints[].bitmap]')" = "$before" ]
    [ "$(qmp qom-list '{"path": "/objects"}' | jq '[.[].name | select(startswith("qbk-"))] | length')" -eq 0 ]
    run qbk-checkpoint check
    [ "$status" -eq 0 ]
    # nothing lost: the next backup is incremental and exact
    random_writes 2 disk0 disk1
    pull_with_writes after "disk0 disk1"
    [ "$(manifest_field after disk0 mode)" = incremental ]
    [ "$(manifest_field after disk0 parent)" = "$INC1" ]
    restore_matches after disk0
    restore_matches after disk1
    [ "$(jq -r .status "$T/repo/backups/$id.partial.json")" = failed ]
    assert_clean
}

@test "another repository's killed backup: a clear refusal, not a silent undo" {
    # a backup of the same VM into another repository, killed
    qbk-pull --repo "$T/repo2" --progress-fd 3 --rate-limit 1M 3>"$T/p2" >/dev/null 2>&1 &
    pid=$!
    wait_fleeced "$T/p2" "$pid"
    kill -KILL "$pid"
    wait "$pid" || true
    run qbk-pull --repo "$T/repo"
    echo "$output"
    [ "$status" -eq 1 ]
    assert_one_line_error
    [[ "$output" == *"not of this repository"*"qbk-checkpoint check --repair"* ]]
    qbk-checkpoint check --repair >/dev/null
    random_writes 2 disk0 disk1
    pull_with_writes after "disk0 disk1"
    restore_matches after disk0
    assert_clean
}

@test "qemu-nbd is served on a socket that listens before it starts: a slow start is no race" {
    # a qemu-nbd whose socket exists a second before it listens (the gap
    # a loaded machine widens): waiting for the file is not waiting for it
    mkdir "$T/bin"
    cp "$BATS_TEST_DIRNAME/tools/slow-qemu-nbd" "$T/bin/qemu-nbd"
    cp "$QBK_BIN/../tests/tools/qbk-test-bind-wait" "$T/bin/"
    PATH="$T/bin:$PATH" run qbk-verify --repo "$T/repo" --backup "$INC1" --disk disk0
    echo "$output"
    [ "$status" -eq 0 ]
    # and a writable one, as a merge serves its new image
    PATH="$T/bin:$PATH" run qbk-merge --repo "$T/repo" --full-at "$INC1" --disk disk0
    echo "$output"
    [ "$status" -eq 0 ]
    restore_matches inc1 disk0
    assert_clean
}
