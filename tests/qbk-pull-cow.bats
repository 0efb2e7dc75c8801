#!/usr/bin/env bats
# How qbk-pull keeps the point in time and what the copier does while the
# guest writes: fleecing schemes A and B, guest-write notices, release of
# copied regions (B), guest-aware pacing. Every backup is checked against
# the shadow model (helpers.bash), byte for byte.

bats_require_minimum_version 1.5.0
load helpers

setup() {
    common_setup
    start_vm
    shadow_init disk0 disk1
    # 32 MiB of data on disk0, so that a rate-limited copy takes seconds
    gw disk0 0 $((32 << 20)) 17
    gw disk1 $((5 << 20)) 2097152 51
}

teardown() {
    common_teardown
}

# trace_line FILE EVENT OFFSET: line number of the first EVENT whose
# range holds OFFSET.
trace_line() {
    awk -v e="$2" -v o="$3" \
        '$2 == e && $3 <= o + 0 && o + 0 < $3 + $4 { print NR; exit }' "$1"
}

# wait_trace FILE EVENT OFFSET: until the copier traced it (bounded).
wait_trace() {
    local i
    for i in $(seq 400); do
        [ -n "$(trace_line "$@" 2>/dev/null)" ] && return 0
        sleep 0.05
    done
    echo "no '$2 $3' in $1" >&2
    return 1
}

# The scenario of both schemes: once the copy passed 4 MiB, the guest
# writes at 0 (copied already; under B released) and at 28 MiB (not
# copied yet). The write at 28 MiB is noticed and copied (with its
# neighbourhood) before the copy in offset order reaches 16 MiB.
notice_scenario() {
    local scheme=$1
    start_pull "$scheme" --fleece "$scheme" --disk disk0 --rate-limit 4M \
        --trace "$T/trace-$scheme" --json
    local pid=$PULL_PID
    wait_fleeced "$T/progress-$scheme" "$pid"
    snapshot "$scheme" disk0
    wait_trace "$T/trace-$scheme" copy $((4 << 20))
    gw disk0 0 65536 99
    gw disk0 $((28 << 20)) 65536 98
    # more writes anywhere, once that one is copied (a newer notice near
    # 16 MiB would rightly go first)
    wait_trace "$T/trace-$scheme" copy $((28 << 20))
    random_writes 4 disk0
    wait "$pid" || { cat "$T/pull-$scheme.err" >&2; false; }
    restore_matches "$scheme" disk0
    [ "$(jq -r .fleece "$T/pull-$scheme.json")" = "$scheme" ]
    [ "$(manifest_field "$scheme" disk0 copier | jq .notices)" -ge 1 ]
    local noticed early
    noticed=$(trace_line "$T/trace-$scheme" copy $((28 << 20)))
    early=$(trace_line "$T/trace-$scheme" copy $((16 << 20)))
    [ -n "$(trace_line "$T/trace-$scheme" notice $((28 << 20)))" ]
    [ -n "$noticed" ] && [ -n "$early" ]
    echo "copy at 28 MiB: line $noticed; at 16 MiB: line $early" >&2
    [ "$noticed" -lt "$early" ]
}

@test "scheme A: notices (allocation depth) move guest-written regions ahead; restore exact" {
    notice_scenario A
    [ "$(manifest_field A disk0 copier | jq .bytes_released)" -eq 0 ]
    assert_clean
}

@test "scheme B: notices, and writes on released regions; restore exact; scratch released" {
    notice_scenario B
    # every copied region was released: data, and the zeros skipped
    [ "$(manifest_field B disk0 copier | jq .bytes_released)" -eq $((64 << 20)) ]
    [ "$(manifest_field B disk0 copier | jq .release_errors)" -eq 0 ]
    [ -n "$(trace_line "$T/trace-B" release 0)" ]
    assert_clean
    # and the chain goes on: an incremental under B, then under A
    random_writes 4 disk0 disk1
    pull_with_writes incb "disk0 disk1" --fleece B
    [ "$(manifest_field incb disk0 mode)" = incremental ]
    restore_matches incb disk0
    restore_matches incb disk1
    random_writes 4 disk0 disk1
    pull_with_writes inca "disk0 disk1" --fleece A
    [ "$(manifest_field inca disk1 mode)" = incremental ]
    restore_matches inca disk0
    restore_matches inca disk1
    assert_clean
}

@test "scheme B keeps the scratch image small; A keeps every copied-before-write cluster" {
    for scheme in A B; do
        start_pull "s$scheme" --fleece "$scheme" --mode full --disk disk0 --rate-limit 8M --json \
            --trace "$T/trace-s$scheme"
        pid=$PULL_PID
        wait_fleeced "$T/progress-s$scheme" "$pid"
        snapshot "s$scheme" disk0
        # the guest rewrites the first 4 MiB once the copy passed them
        wait_trace "$T/trace-s$scheme" copy $((6 << 20)) || { cat "$T/pull-s$scheme.err" "$T/trace-s$scheme" | head -20 >&2; false; }
        gw disk0 0 $((4 << 20)) 77
        scratch=$(du -k "$T/repo/.scratch" | tail -1 | cut -f1)
        echo "$scheme scratch after the rewrite: ${scratch} KiB" >&2
        eval "scratch_$scheme=$scratch"
        wait "$pid"
        restore_matches "s$scheme" disk0
        assert_clean
    done
    # A copied 4 MiB before write; B had released them: no copy at all
    [ "$scratch_A" -ge 4096 ]
    [ "$scratch_B" -lt 1024 ]
}

@test "pacing: an unreachable latency target takes the window down to 1; restore exact" {
    pull_with_writes paced "disk0 disk1" --fleece B --guest-latency-target 0.001
    restore_matches paced disk0
    restore_matches paced disk1
    pacing=$(manifest_field paced disk0 copier | jq -c .pacing)
    [ "$(jq .min <<<"$pacing")" -eq 1 ]
    [ "$(jq .cuts <<<"$pacing")" -ge 1 ]
    [ "$(jq .target_us <<<"$pacing")" -eq 1 ]
    run -2 qbk-pull --repo "$T/repo" --guest-latency-target -1
    run -2 qbk-pull --repo "$T/repo" --fleece C
    [[ "$output" == *"--fleece must be A, B or auto"* ]]
    assert_clean
}

@test "scheme B on a running VM: both disks at one instant, the pause measured, VM running after" {
    qmp cont >/dev/null
    [ "$(qmp query-status | jq -r .status)" = running ]
    pull_with_writes run "disk0 disk1" --fleece B
    restore_matches run disk0
    restore_matches run disk1
    pause=$(jq .pause_ms "$T/pull-run.json")
    echo "paused ${pause} ms" >&2
    [ "$(jq 'has("pause_ms") and .pause_ms > 0 and .pause_ms < 5000' "$T/pull-run.json")" = true ]
    [ "$(qmp query-status | jq -r .status)" = running ]
    assert_clean
}

@test "killed while the VM was paused to fleece: the next run resumes it (staged)" {
    qmp cont >/dev/null
    pull_with_writes first "disk0 disk1" --fleece B
    start_pull killed --fleece B --rate-limit 1M
    pid=$PULL_PID
    wait_fleeced "$T/progress-killed" "$pid"
    kill -KILL "$pid"
    wait "$pid" || true
    # as if the kill came between 'stop' and 'cont'
    partial=$(ls "$T"/repo/backups/*.partial.json)
    jq '.pausing = true' "$partial" >"$T/p.json" && mv "$T/p.json" "$partial"
    qmp stop >/dev/null
    [ "$(qmp query-status | jq -r .status)" = paused ]
    pull_with_writes after "disk0 disk1" --fleece B
    [ "$(qmp query-status | jq -r .status)" = running ]
    restore_matches after disk0
    restore_matches after disk1
    assert_clean
}
