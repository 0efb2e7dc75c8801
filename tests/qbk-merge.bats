#!/usr/bin/env bats
# qbk-merge: chains built by real qbk-pull runs with the guest writing
# during each copy (shadow model), then merged without the VM; after every
# merge, and after a crash at every step of one, each kept backup restores
# byte-identical to its point in time and qbk-verify passes.

bats_require_minimum_version 1.5.0
load helpers

setup() {
    common_setup
    two_disk_vm
    backup_chain 3 6
}

teardown() {
    common_teardown
}

# kept NAME...: each restores exactly, for both disks
kept() {
    local n
    for n in "$@"; do
        restore_matches "$n" disk0
        restore_matches "$n" disk1
    done
}

parent_of() { # BACKUP DISK
    jq -r --arg d "$2" '.disks[] | select(.disk == $d) | .parent' \
        "$T/repo/backups/$1.json"
}

@test "--from --to: adjacent increments become one; every kept point exact; verify passes" {
    run -0 --separate-stderr qbk-merge --repo "$T/repo" --from "$INC1" --to "$INC2" --json
    echo "$output"
    # disk2 (raw, always full) has nothing to merge and says so
    [ "$(jq '.results | length' <<<"$output")" -eq 2 ]
    [ "$(jq -r '.results[0].dropped | join(",")' <<<"$output")" = "$INC1" ]
    [ "$(parent_of "$INC2" disk0)" = "$FULL" ]
    [ "$(parent_of "$INC3" disk0)" = "$INC2" ]
    [ ! -e "$T/repo/disks/disk0/$INC1.qcow2" ]
    [ -e "$T/repo/backups/$INC1.json" ]   # keeps disk2
    [ "$(jq '.disks | length' "$T/repo/backups/$INC1.json")" -eq 1 ]
    # the merged image holds the union of the two increments, no more
    q1=$(qemu-img map --output=json "$T/repo/disks/disk0/$INC2.qcow2" |
        jq '[.[] | select(.depth == 0 and .data) | .length] | add')
    [ "$q1" -gt 0 ]
    kept full inc2 inc3
    run -0 qbk-verify --repo "$T/repo"
    # merging the rest: FROM the full backup gives a full at INC3
    run -0 qbk-merge --repo "$T/repo" --disk disk0 --from "$FULL" --to "$INC3"
    [ "$(parent_of "$INC3" disk0)" = null ]
    [ "$(jq -r '.disks[] | select(.disk == "disk0") | .mode' "$T/repo/backups/$INC3.json")" = full ]
    restore_matches inc3 disk0
    restore_matches inc3 disk1
    run -0 qbk-verify --repo "$T/repo"
    assert_clean
}

@test "--full-at: a synthetic full (qcow2 and raw) at any point; later backups stay exact" {
    run -0 qbk-merge --repo "$T/repo" --full-at "$INC2" --disk disk0
    [ "$(parent_of "$INC2" disk0)" = null ]
    [ -z "$(qemu-img info --output=json "$T/repo/disks/disk0/$INC2.qcow2" | jq -r '."backing-filename" // empty')" ]
    kept full inc1 inc2 inc3
    run -0 qbk-merge --repo "$T/repo" --full-at "$INC1" --disk disk1 --format raw
    [ -e "$T/repo/disks/disk1/$INC1.raw" ]
    [ ! -e "$T/repo/disks/disk1/$INC1.qcow2" ]
    kept full inc1 inc2 inc3
    run -0 qbk-verify --repo "$T/repo"
    # a new backup after the merges still chains on correctly
    random_writes 4 disk0 disk1
    pull_with_writes inc4 "disk0 disk1"
    [ "$(manifest_field inc4 disk0 mode)" = incremental ]
    kept inc4
}

@test "a release build has no crash points: QBK_CRASH_AT is ignored" {
    [ -n "${QBK_RELEASE_BIN:-}" ] || skip "no release build (scripts/test makes one)"
    run env QBK_CRASH_AT=merge-1 QBK_MERGE_CRASH_AT=1 \
        "$QBK_RELEASE_BIN/qbk-merge" --repo "$T/repo" --disk disk0 \
        --from "$INC1" --to "$INC2"
    [ "$status" -eq 0 ]
    [ "$(parent_of "$INC2" disk0)" = "$FULL" ]
    kept full inc2 inc3
}

@test "a crash at each step of a merge: every kept point restores; the next run finishes it" {
    cp -a "$T/repo" "$T/repo.orig"
    for step in 1 2 3 4 5 6; do
        rm -rf "$T/repo"
        cp -a "$T/repo.orig" "$T/repo"
        run env QBK_CRASH_AT=merge-$step qbk-merge --repo "$T/repo" \
            --disk disk0 --from "$INC1" --to "$INC2"
        [ "$status" -eq 99 ]
        # whatever the step: every backup still listed restores exactly
        for n in full inc1 inc2 inc3; do
            id=$(jq -r .id "$T/pull-$n.json")
            if [ -e "$T/repo/backups/$id.json" ] &&
               jq -e '.disks[] | select(.disk == "disk0")' "$T/repo/backups/$id.json" >/dev/null; then
                restore_matches "$n" disk0
            fi
        done
        # the next run finishes it (a journal) or undoes it (none yet)
        run qbk-merge --repo "$T/repo"
        echo "step $step: $output"
        [ "$status" -eq 0 ]
        [ ! -e "$T/repo/merge-journal.json" ]
        [ -z "$(ls "$T"/repo/disks/disk0/*merging* 2>/dev/null)" ]
        if [ "$step" -le 2 ]; then
            [ "$(parent_of "$INC2" disk0)" = "$INC1" ]
        else
            [ "$(parent_of "$INC2" disk0)" = "$FULL" ]
            [ ! -e "$T/repo/disks/disk0/$INC1.qcow2" ]
        fi
        restore_matches inc2 disk0
        restore_matches inc3 disk0
        run -0 qbk-verify --repo "$T/repo" --disk disk0
    done
}

@test "a merge journal left by a qbk from before sparse digests: finished with its digests labelled dense; verify passes" {
    run env QBK_CRASH_AT=merge-3 qbk-merge --repo "$T/repo" \
        --disk disk0 --from "$INC1" --to "$INC2"
    [ "$status" -eq 99 ]
    # as that qbk left it: dense digests, and a journal that does not say
    dig=$T/repo/disks/disk0/$INC2.merging.digests
    size=$(jq '.disks[] | select(.disk == "disk0") | .size' "$T/repo/backups/$INC2.json")
    "$QBK_BIN/../tests/tools/qbk-test-dense-digests" "$size" "$dig" "$T/dense" >/dev/null
    cat "$T/dense" >"$dig"
    [ "$(jq -r .digests_layout "$T/repo/merge-journal.json")" = sparse ]
    jq 'del(.digests_layout)' "$T/repo/merge-journal.json" >"$T/j.json"
    cat "$T/j.json" >"$T/repo/merge-journal.json"
    run -0 qbk-merge --repo "$T/repo"
    [ ! -e "$T/repo/merge-journal.json" ]
    [ "$(parent_of "$INC2" disk0)" = "$FULL" ]
    run -0 jq -e '.disks[] | select(.disk == "disk0") | has("digests_layout") | not' \
        "$T/repo/backups/$INC2.json"
    run -0 qbk-verify --repo "$T/repo" --disk disk0
    restore_matches inc2 disk0
    restore_matches inc3 disk0
    assert_clean
}

@test "refusals: a damaged link, a backup standing on a link, bad input; nothing changes" {
    # a differential stands on the full backup
    random_writes 3 disk0 disk1
    pull_with_writes diff "disk0 disk1" --mode differential
    DIFF=$(jq -r .id "$T/pull-diff.json")
    before=$(cat "$T"/repo/backups/*.json | md5sum)
    run -1 qbk-merge --repo "$T/repo" --disk disk0 --from "$FULL" --to "$INC2"
    [[ "$output" == *"cannot drop what another backup needs: backup '$DIFF' stands on '$FULL'"* ]]
    # a flipped byte in INC1, where INC2 still shows it: the merge would
    # not equal INC2 (depth 1 of INC2's chain is INC1's own layer)
    img=$T/repo/disks/disk0/$INC1.qcow2
    off=$(qemu-img map --output=json "$T/repo/disks/disk0/$INC2.qcow2" |
        jq -r '[.[] | select(.data and .depth == 1 and .offset != null)][0].offset')
    [ "$off" != null ]
    printf '\xff' | dd of="$img" bs=1 seek="$((off + 77))" conv=notrunc status=none
    run -1 qbk-merge --repo "$T/repo" --disk disk0 --from "$INC1" --to "$INC2"
    [[ "$output" == *"the merged image would not equal backup '$INC2'"* ]]
    [ "$(cat "$T"/repo/backups/*.json | md5sum)" = "$before" ]
    [ -z "$(ls "$T"/repo/disks/disk0/*merging* 2>/dev/null)" ]
    run -2 qbk-merge --repo "$T/repo" --from "$INC1"
    run -2 qbk-merge --repo "$T/repo" --full-at nosuch
    run -2 qbk-merge --repo "$T/repo" --disk disk0 --from "$INC3" --to "$INC1"
    run -2 qbk-merge --repo "$T/nowhere" --full-at "$INC1"
    [[ "$output" == *"not a qbk repository"* ]]
}

# Retention over a synthetic calendar: 12 real backups (full + 11
# incrementals, the guest writing during each), dated every 3 days from
# 2026-10-20 to 2026-11-22; the expected kept set is computed here with jq.
@test "retention: --dry-run plans, the run keeps exactly the policy's points, each exact" {
    for n in $(seq 4 11); do
        random_writes 4 disk0 disk1
        pull_with_writes inc$n "disk0 disk1"
    done
    names=(full inc1 inc2 inc3 inc4 inc5 inc6 inc7 inc8 inc9 inc10 inc11)
    for i in "${!names[@]}"; do
        id=$(jq -r .id "$T/pull-${names[$i]}.json")
        when=$(date -u -d "2026-10-20 +$((i * 3)) days 12:00" +%Y-%m-%dT%H:%M:%SZ)
        jq --arg w "$when" '.created = $w' "$T/repo/backups/$id.json" >"$T/m.json"
        mv "$T/m.json" "$T/repo/backups/$id.json"
        echo "${names[$i]} $id $when" >>"$T/calendar"
    done
    expected=$(jq -R -s -c '
        [split("\n")[] | select(length > 0) | split(" ") | {n: .[0], id: .[1], c: .[2]}]
        | sort_by(.c) | reverse as $all
        | def keep(k; fmt): reduce $all[] as $b ({seen: [], ids: []};
              ($b.c | strptime("%Y-%m-%dT%H:%M:%SZ") | mktime | strftime(fmt)) as $key
              | if (.seen | length) >= k or (.seen | any(. == $key)) then .
                else .seen += [$key] | .ids += [$b.id] end) | .ids;
          ([$all[0].id] + keep(3; "%Y-%m-%d") + keep(2; "%G-W%V") + keep(2; "%Y-%m"))
          | unique' "$T/calendar")
    echo "expected: $expected"
    before=$(cat "$T"/repo/backups/*.json | md5sum)
    run -0 --separate-stderr qbk-merge --repo "$T/repo" --keep-daily 3 \
        --keep-weekly 2 --keep-monthly 2 --dry-run --json
    [ "$(jq -c '[.keep[].id] | sort' <<<"$output")" = "$expected" ]
    [ "$(cat "$T"/repo/backups/*.json | md5sum)" = "$before" ]
    run -0 qbk-merge --repo "$T/repo" --keep-daily 3 --keep-weekly 2 --keep-monthly 2
    echo "$output"
    # the repository holds the kept points (disk2, raw, is in each)
    have=$(for f in "$T"/repo/backups/*.json; do jq -r .id "$f"; done | jq -R -s -c 'split("\n") | map(select(length > 0)) | sort')
    [ "$have" = "$expected" ]
    while read -r name id when; do
        if jq -e --arg id "$id" 'index($id)' <<<"$expected" >/dev/null; then
            restore_matches "$name" disk0
            restore_matches "$name" disk1
        fi
    done <"$T/calendar"
    run -0 qbk-verify --repo "$T/repo"
    # and backups go on from there
    random_writes 3 disk0 disk1
    pull_with_writes after "disk0 disk1"
    [ "$(manifest_field after disk0 mode)" = incremental ]
    restore_matches after disk0
}

@test "restore --into: forward, back, across a branch, qcow2; only what differs is written" {
    qbk-restore --repo "$T/repo" --disk disk0 --backup "$FULL" -o "$T/live.raw"
    size=$(stat -c %s "$T/live.raw")
    run -0 --separate-stderr qbk-restore --repo "$T/repo" --disk disk0 \
        --into "$T/live.raw" --from "$FULL" --backup "$INC3" --verify --json
    [ "$(jq -r .verified <<<"$output")" = true ]
    [ "$(jq -r .common <<<"$output")" = "$FULL" ]
    [ "$(jq .bytes_changed <<<"$output")" -lt $((size / 4)) ]
    cmp "$T/live.raw" "$T/expect-inc3-disk0.raw"
    # back in time
    run -0 --separate-stderr qbk-restore --repo "$T/repo" --disk disk0 \
        --into "$T/live.raw" --from "$INC3" --backup "$INC1" --json
    [ "$(jq -r .common <<<"$output")" = "$INC1" ]
    cmp "$T/live.raw" "$T/expect-inc1-disk0.raw"
    # across a branch: a differential stands on the full backup
    random_writes 3 disk0 disk1
    pull_with_writes diff "disk0 disk1" --mode differential
    DIFF=$(jq -r .id "$T/pull-diff.json")
    run -0 --separate-stderr qbk-restore --repo "$T/repo" --disk disk0 \
        --into "$T/live.raw" --from "$INC1" --backup "$DIFF" --json
    [ "$(jq -r .common <<<"$output")" = "$FULL" ]
    cmp "$T/live.raw" "$T/expect-diff-disk0.raw"
    # a qcow2 image, checked
    qbk-restore --repo "$T/repo" --disk disk1 --backup "$INC2" -o "$T/live1.qcow2" --format qcow2
    run -0 qbk-restore --repo "$T/repo" --disk disk1 --into "$T/live1.qcow2" \
        --from "$INC2" --backup "$FULL" --verify
    qemu-img convert -O raw "$T/live1.qcow2" "$T/live1.raw"
    cmp "$T/live1.raw" "$T/expect-full-disk1.raw"
    # a wrong claim about the image is caught by --verify
    qbk-restore --repo "$T/repo" --disk disk0 --backup "$INC1" -o "$T/one.raw"
    run -1 qbk-restore --repo "$T/repo" --disk disk0 --into "$T/one.raw" \
        --from "$INC2" --backup "$INC3" --verify
    [[ "$output" == *"does not equal disk 'disk0' of backup '$INC3'"* ]]
    run -2 qbk-restore --repo "$T/repo" --disk disk0 --into "$T/one.raw" --backup "$INC3"
}

@test "every adjacent pair, and a synthetic full at every point, each on a fresh copy: all exact" {
    # (not "i": bats' run uses that name)
    cp -a "$T/repo" "$T/repo.orig"
    names=(full inc1 inc2 inc3)
    ids=("$FULL" "$INC1" "$INC2" "$INC3")
    for pair in 0 1 2; do
        rm -rf "$T/repo" && cp -a "$T/repo.orig" "$T/repo"
        run -0 qbk-merge --repo "$T/repo" --from "${ids[$pair]}" --to "${ids[$((pair + 1))]}"
        for k in "${!names[@]}"; do
            [ "$k" -eq "$pair" ] && continue  # merged away
            restore_matches "${names[$k]}" disk0
            restore_matches "${names[$k]}" disk1
        done
        run -0 qbk-verify --repo "$T/repo" --quiet
    done
    for point in 1 2 3; do
        rm -rf "$T/repo" && cp -a "$T/repo.orig" "$T/repo"
        run -0 qbk-merge --repo "$T/repo" --full-at "${ids[$point]}"
        [ "$(parent_of "${ids[$point]}" disk0)" = null ]
        for n in "${names[@]}"; do
            restore_matches "$n" disk0
            restore_matches "$n" disk1
        done
        run -0 qbk-verify --repo "$T/repo" --quiet
    done
}

@test "a relative --repo works for every command (qemu-img and qemu-nbd run elsewhere)" {
    cd "$T"
    random_writes 3 disk0 disk1
    run -0 qbk-pull --repo repo --quiet
    run -0 qbk-verify --repo repo --backup latest --quiet
    run -0 qbk-merge --repo repo --from "$INC3" --to latest --disk disk0
    run -0 qbk-merge --repo repo --full-at "$INC2" --disk disk1
    run -0 qbk-restore --repo repo --disk disk0 -o out.raw
    run -0 qbk-restore --repo repo --disk disk0 --into out.raw --from latest --backup "$INC2" --verify
    cmp out.raw "$T/expect-inc2-disk0.raw"
    run -0 qbk-verify --repo repo --quiet
}
