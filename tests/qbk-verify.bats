#!/usr/bin/env bats
# qbk-verify: chains built by real qbk-pull runs under guest writes, then
# checked without the VM; every kind of damage is caught with a clear
# message and exit status 1.

bats_require_minimum_version 1.5.0
load helpers

setup() {
    common_setup
    two_disk_vm
    backup_chain 2 4
}

teardown() {
    common_teardown
}

@test "every backup of every disk verifies; --json, --backup, --disk" {
    run qbk-verify --repo "$T/repo"
    echo "$output"
    [ "$status" -eq 0 ]
    [ "$(grep -c ' ok ' <<<"$output")" -eq 9 ]   # disk2 (raw) is always full
    [[ "$output" == *"$INC2  disk0"*"(3 links"* ]]
    run -0 qbk-verify --repo "$T/repo" --backup latest --disk disk1 --json
    [ "$(jq '.results | length' <<<"$output")" -eq 1 ]
    [ "$(jq -r '.results[0].chain | join(",")' <<<"$output")" = "$INC2,$INC1,$FULL" ]
    # the checksum it computes is the manifest's
    [ "$(jq -r '.results[0].checksum' <<<"$output")" = \
      "$(jq -r '.disks[] | select(.disk == "disk1") | .checksum.value' "$T/repo/backups/$INC2.json")" ]
    run -2 qbk-verify --repo "$T/repo" --backup nosuch
    run -2 qbk-verify --repo "$T/repo" --disk nosuch
}

# unshadowed_offset IMAGE ABOVE: the host offset of a data cluster of IMAGE
# that the next link ABOVE does not overwrite (reads of ABOVE's chain go
# through it)
unshadowed_offset() {
    local above
    above=$(qemu-img map --output=json -f qcow2 "$2" |
        jq -c '[.[] | select(.depth == 0 and .data) | [.start, .start + .length]]')
    qemu-img map --output=json -f qcow2 "$1" |
        jq -r --argjson above "$above" '[.[] | select(.data and .depth == 0 and
            .offset != null) | . as $e | range(0; .length; 65536) as $d |
            {start: ($e.start + $d), offset: ($e.offset + $d)} |
            select(.start as $s | all($above[]; .[1] <= $s or .[0] >= $s + 65536))
            ][0].offset'
}

@test "a flipped byte in a link: mismatch, the offset named, later backups fail too" {
    img=$T/repo/disks/disk0/$INC1.qcow2
    off=$(unshadowed_offset "$img" "$T/repo/disks/disk0/$INC2.qcow2")
    [ "$off" != null ]
    printf '\xff' | dd of="$img" bs=1 seek="$((off + 1000))" conv=notrunc status=none
    run -1 qbk-verify --repo "$T/repo" --disk disk0
    echo "$output"
    [[ "$output" == *"$FULL  disk0"*" ok "* ]]
    [[ "$output" == *"$INC1  disk0"*"FAILED: disk 'disk0' of backup '$INC1' does not match its checksum"*"first different block at offset"* ]]
    [[ "$output" == *"$INC2  disk0"*"FAILED"* ]]
    run -0 qbk-verify --repo "$T/repo" --disk disk1
}

@test "a truncated image, a missing link, a wrong backing name: each named" {
    # truncated: qcow2 metadata now points past the end
    img=$T/repo/disks/disk1/$INC1.qcow2
    truncate -s $(( $(stat -c %s "$img") / 2 )) "$img"
    run -1 qbk-verify --repo "$T/repo" --backup "$INC1" --disk disk1
    echo "$output"
    [[ "$output" == *"FAILED"* ]]
    # missing link
    mv "$T/repo/disks/disk0/$FULL.qcow2" "$T/full.qcow2"
    run -1 qbk-verify --repo "$T/repo" --backup "$INC2" --disk disk0
    echo "$output"
    [[ "$output" == *"is broken: image '$T/repo/disks/disk0/$FULL.qcow2' is missing"* ]]
    mv "$T/full.qcow2" "$T/repo/disks/disk0/$FULL.qcow2"
    # wrong backing name (pointing at a valid image: only the manifest knows)
    qemu-img rebase -u -f qcow2 -b "$FULL.qcow2" -F qcow2 "$T/repo/disks/disk0/$INC2.qcow2"
    run -1 qbk-verify --repo "$T/repo" --backup "$INC2" --disk disk0
    echo "$output"
    [[ "$output" == *"names backing file '$FULL.qcow2' where the manifest says '$INC1.qcow2'"* ]]
    # a missing parent manifest
    mv "$T/repo/backups/$FULL.json" "$T/full.json"
    run -1 qbk-verify --repo "$T/repo" --backup "$INC1" --disk disk0
    [[ "$output" == *"ancestor '$FULL' is missing or unreadable"* ]]
}
