#!/usr/bin/env bats
# qbk-pull --compress: qcow2 images of zstd-compressed clusters, written
# through QEMU's compress filter; restored, verified and merged as any
# other, and read by qemu-img as they are.

bats_require_minimum_version 1.5.0
load helpers

setup() {
    common_setup
    two_disk_vm
}

teardown() {
    common_teardown
}

# repo_field BACKUP DISK FIELD: a field of the repository's manifest now
repo_field() {
    jq -r --arg d "$2" --arg f "$3" '.disks[] | select(.disk == $d) | .[$f]' \
        "$T/repo/backups/$(jq -r .id "$T/pull-$1.json").json"
}

# compressed_clusters IMAGE: the share of its allocated clusters that are
# compressed, in percent (qemu-img check)
compressed_clusters() {
    qemu-img check "$1" | sed -n 's/.* \([0-9.]*\)% compressed clusters/\1/p'
}

@test "--compress: full and incrementals of zstd clusters while the guest writes; restores exact, verify passes, qemu-img reads them; merge keeps them compressed" {
    # 16 MiB of text-like data: it compresses
    for i in 0 1 2 3; do
        base64 -w 76 </dev/urandom | head -c $((4 << 20)) >"$T/text"
        guest_write_file disk0 $(((8 + 4 * i) << 20)) "$T/text"
    done
    # and 4 MiB of random bytes: they would not shrink
    head -c $((4 << 20)) /dev/urandom >"$T/random"
    guest_write_file disk0 $((40 << 20)) "$T/random"
    pull_with_writes full "disk0 disk1" --compress
    full=$T/repo/$(manifest_field full disk0 image)
    [ "$(manifest_field full disk0 compression)" = zstd ]
    [ "$(qemu-img info --output=json "$full" | jq -r '."format-specific".data."compression-type"')" = zstd ]
    # the text is compressed, the random bytes are stored as they are (64
    # of the 384 data clusters: 83.33% compressed), and the image is
    # smaller than its data
    share=$(compressed_clusters "$full")
    echo "compressed: $share%"
    [ "$share" = 83.33 ]
    [ "$(stat -c %s "$full")" -lt $((20 << 20)) ]
    restore_matches full disk0
    restore_matches full disk1
    random_writes 4 disk0 disk1
    pull_with_writes inc1 "disk0 disk1" --compress
    [ "$(manifest_field inc1 disk0 mode)" = incremental ]
    # (a block a write landed in within the random bytes stays plain)
    share=$(compressed_clusters "$T/repo/$(manifest_field inc1 disk0 image)")
    awk -v s="$share" 'BEGIN { exit !(s > 50) }'
    restore_matches inc1 disk0
    restore_matches inc1 disk1
    random_writes 4 disk0 disk1
    pull_with_writes inc2 "disk0 disk1" --compress
    run -0 qbk-verify --repo "$T/repo"
    # qemu-img reads the chain as it is
    qemu-img convert -O raw "$T/repo/$(manifest_field inc2 disk0 image)" "$T/plain.raw"
    cmp "$T/plain.raw" "$T/expect-inc2-disk0.raw"
    # merged: the new image is compressed too, and restores exactly
    run -0 qbk-merge --repo "$T/repo" --from "$(jq -r .id "$T/pull-inc1.json")" \
        --to "$(jq -r .id "$T/pull-inc2.json")"
    merged=$T/repo/$(repo_field inc2 disk0 image)
    [ "$(compressed_clusters "$merged")" = 100.00 ]
    restore_matches inc2 disk0
    restore_matches inc2 disk1
    run -0 qbk-verify --repo "$T/repo"
    # a synthetic raw full from compressed links: plain, and still exact
    run -0 qbk-merge --repo "$T/repo" --full-at "$(jq -r .id "$T/pull-inc2.json")" \
        --disk disk0 --format raw
    [ "$(repo_field inc2 disk0 compression)" = null ]
    [ "$(repo_field inc2 disk0 format)" = raw ]
    restore_matches inc2 disk0
    assert_clean
}

@test "--compress with --format raw is refused before anything is touched" {
    fails 2 "--compress writes qcow2" qbk-pull --repo "$T/repo" --compress --format raw
    [ ! -e "$T/repo" ]
    [ "$(qmp query-block-exports | jq length)" -eq 0 ]
}
