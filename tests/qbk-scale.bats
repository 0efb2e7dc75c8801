#!/usr/bin/env bats
# Scale at full correctness, on sizes the suite can afford: a VM with 16
# disks, a chain of 100 backups (100 checkpoints on the disk), a 1 TiB
# sparse disk. The costs are measured by bench/scale; these tests catch a
# regression in behaviour: what is copied, kept and written must follow
# the data, not the size, and every restore must be exact.

bats_require_minimum_version 1.5.0

load helpers

# many_disk_vm N: a paused VM with N qcow2 disks of $DISK_SIZE, devices
# disk0 ... disk<N-1> on format nodes disk<i>-fmt, and their shadows.
many_disk_vm() {
    local i args=()
    for ((i = 0; i < $1; i++)); do
        qemu-img create -q -f qcow2 "$T/disk$i.qcow2" "$DISK_SIZE"
        args+=(-blockdev "driver=file,filename=$T/disk$i.qcow2,node-name=disk$i-file"
            -blockdev "driver=qcow2,file=disk$i-file,node-name=disk$i-fmt"
            -device "virtio-blk-pci,drive=disk$i-fmt,id=disk$i")
        shadow_init "disk$i"
    done
    qemu-system-x86_64 -M q35 -S -display none -nodefaults -no-user-config \
        -qmp "unix:$T/qmp.sock,server=on,wait=off" \
        -qmp "unix:$T/test.sock,server=on,wait=off" \
        "${args[@]}" -pidfile "$T/qemu.pid" -daemonize
}

# same_data NAME DISK [BACKUP-ID]: restore and compare with qemu-img
# compare, which reads only where either side holds data (a 1 TiB cmp
# would read a terabyte of holes).
same_data() {
    local id=${3:-$(jq -r .id "$T/pull-$1.json")}
    qbk-restore --repo "$T/repo" --disk "$2" --backup "$id" -o "$T/restored.raw"
    qemu-img compare -q -f raw -F raw "$T/restored.raw" "$T/expect-$1-$2.raw"
    rm -f "$T/restored.raw"
}

@test "16 disks: one instant for all in one transaction; full and incremental restore exact on every disk" {
    DISK_SIZE=16M
    many_disk_vm 16
    disks=$(printf 'disk%d ' $(seq 0 15))
    for d in $disks; do
        gw "$d" $((RANDOM % 15 * 1048576)) 1048576 $((RANDOM % 250 + 1))
    done
    QBK_QMP_TRACE=$T/trace-full pull_with_writes full "$disks"
    random_writes 1 $disks
    QBK_QMP_TRACE=$T/trace-inc pull_with_writes inc "$disks"
    [ "$(jq '.disks | length' "$T/pull-inc.json")" -eq 16 ]
    [ "$(jq '[.disks[] | select(.mode == "incremental")] | length' "$T/pull-inc.json")" -eq 16 ]
    # one transaction made the checkpoint of all 16 disks; an incremental
    # adds a second (scheme B stops the older bitmaps once the filters are
    # in) and one more removes every "since" bitmap: never one per disk
    for t in full inc; do
        [ "$(grep '"execute": *"transaction"' "$T/trace-$t" | head -1 |
            grep -o '"block-dirty-bitmap-add","data":{[^}]*"persistent":true' | wc -l)" -eq 16 ]
        [ "$(grep -c '"execute": *"stop"' "$T/trace-$t")" -le 1 ]
    done
    [ "$(grep -c '"execute": *"transaction"' "$T/trace-full")" -eq 1 ]
    [ "$(grep -c '"execute": *"transaction"' "$T/trace-inc")" -eq 3 ]
    for d in $disks; do
        restore_matches full "$d"
        restore_matches inc "$d"
    done
    assert_clean
}

@test "a chain of 100 backups: 100 checkpoints; the newest and any point restore exact; since the oldest and a deletion in the middle keep every write" {
    DISK_SIZE=8M
    many_disk_vm 1
    for ((n = 1; n <= 100; n++)); do
        gw disk0 $(((n * 37 % 120) * 65536)) 65536 $((n % 250 + 1))
        if ((n % 25 == 0)); then
            pull_with_writes "b$n" disk0
        else
            qbk-pull --repo "$T/repo" --json --quiet >"$T/pull-b$n.json"
            snapshot "b$n" disk0
        fi
    done
    [ "$(jq -r '.disks[0].mode' "$T/pull-b100.json")" = incremental ]
    run -0 qbk-checkpoint list --json
    [ "$(jq '[.checkpoints[] | select(.disks[0].disk == "disk0")] | length' <<<"$output")" -eq 100 ]
    # the newest backup stands on all 100 links
    same_data b100 disk0
    same_data b50 disk0
    same_data b1 disk0
    qbk-verify --repo "$T/repo" --backup "$(jq -r .id "$T/pull-b100.json")" --quiet
    # everything written since the oldest checkpoint is in one bitmap: a
    # differential on the full holds every write of the 99 links
    gw disk0 $((127 * 65536)) 65536 201
    b1=$(jq -r .id "$T/pull-b1.json")
    run -0 qbk-checkpoint since "$b1" --into all-since-b1
    qmp block-dirty-bitmap-remove '{"node": "disk0-fmt", "name": "all-since-b1"}' >/dev/null
    pull_with_writes diff disk0 --since "$b1"
    [ "$(jq -r '.disks[0].parent' "$T/pull-diff.json")" = "$b1" ]
    same_data diff disk0
    # a checkpoint deleted in the middle: its writes move to the one before,
    # so the next incremental (and any since an older one) misses nothing
    run -0 qbk-checkpoint delete "$(jq -r .id "$T/pull-b50.json")"
    run -0 qbk-checkpoint check
    gw disk0 $((100 * 65536)) 65536 202
    pull_with_writes after disk0
    [ "$(jq -r '.disks[0].mode' "$T/pull-after.json")" = incremental ]
    same_data after disk0
    assert_clean
}

@test "a 1 TiB sparse disk: full and incremental restore exact; digest files hold the data's pages, not the disk's" {
    DISK_SIZE=1T
    many_disk_vm 1
    # data at the start, the middle and the very end of the terabyte
    gw disk0 0 1048576 11
    gw disk0 $((512 << 30)) 1048576 12
    gw disk0 $(((1 << 40) - 1048576)) 1048576 13
    pull_with_writes full disk0
    full=$(jq -r .id "$T/pull-full.json")
    gw disk0 $((700 << 30)) 65536 14
    pull_with_writes inc disk0
    inc=$(jq -r .id "$T/pull-inc.json")
    [ "$(jq -r '.disks[0].mode' "$T/pull-inc.json")" = incremental ]
    # copied: the dirty data, not the size
    [ "$(jq '.disks[0].bytes_read' "$T/pull-inc.json")" -lt $((8 << 20)) ]
    same_data full disk0
    same_data inc disk0
    qbk-verify --repo "$T/repo" --quiet
    # a dense digest file of 1 TiB would hold 256 MiB
    for id in "$full" "$inc"; do
        [ "$(stat -c %s "$T/repo/disks/disk0/$id.digests")" -eq $((256 << 20)) ]
        [ "$(du -k "$T/repo/disks/disk0/$id.digests" | cut -f1)" -lt 1024 ]
    done
    assert_clean
}

@test "a repository from before sparse digests and data-block checksums: read, verified, restored; incrementals on it and merges of it are exact" {
    DISK_SIZE=64M
    many_disk_vm 1
    gw disk0 0 $((4 << 20)) 21
    pull_with_writes full disk0
    full=$(jq -r .id "$T/pull-full.json")
    # make the full as the first repositories wrote it: a dense digest
    # file, no "digests_layout" in the manifest, a checksum over every block
    dig=$T/repo/disks/disk0/$full.digests
    old=$("$QBK_BIN/../tests/tools/qbk-test-dense-digests" $((64 << 20)) "$dig" "$T/dense")
    cat "$T/dense" >"$dig"
    [ "$(du -k "$dig" | cut -f1)" -ge 16 ]
    [ "$old" != "$(jq -r '.disks[0].checksum.value' "$T/repo/backups/$full.json")" ]
    jq --arg v "$old" 'del(.disks[0].digests_layout) |
        .disks[0].checksum = {algorithm: "xxh3-128-blocks-64k", value: $v}' \
        "$T/repo/backups/$full.json" >"$T/m.json"
    cat "$T/m.json" >"$T/repo/backups/$full.json"
    # a wrong old checksum is caught by verify and by restore
    jq '.disks[0].checksum.value = "00000000000000000000000000000000"' "$T/m.json" >"$T/repo/backups/$full.json"
    run qbk-verify --repo "$T/repo" --backup "$full"
    [ "$status" -eq 1 ]
    run qbk-restore --repo "$T/repo" --disk disk0 --backup "$full" -o "$T/r.raw"
    [ "$status" -eq 1 ]
    [ ! -e "$T/r.raw" ]
    cat "$T/m.json" >"$T/repo/backups/$full.json"
    qbk-verify --repo "$T/repo" --quiet
    # a damaged dense file is caught as a sparse one is: no incremental on it
    cp "$dig" "$T/good"
    printf '\x01' | dd of="$dig" bs=1 seek=100 conv=notrunc status=none
    run qbk-pull --repo "$T/repo" --mode incremental
    [ "$status" -eq 3 ]
    [[ "$output" == *"block digests of backup '$full' are damaged"* ]]
    cat "$T/good" >"$dig"
    random_writes 2 disk0
    pull_with_writes inc disk0
    inc=$(jq -r .id "$T/pull-inc.json")
    [ "$(jq -r '.disks[0].mode' "$T/pull-inc.json")" = incremental ]
    [ "$(jq -r '.disks[0].digests_layout' "$T/repo/backups/$inc.json")" = sparse ]
    [ "$(jq -r '.disks[0].checksum.algorithm' "$T/repo/backups/$inc.json")" = xxh3-128-data-blocks-64k ]
    restore_matches full disk0
    restore_matches inc disk0
    qbk-verify --repo "$T/repo" --quiet
    qbk-merge --repo "$T/repo" --full-at "$inc" --quiet
    restore_matches inc disk0
    qbk-verify --repo "$T/repo" --quiet
    assert_clean
}
