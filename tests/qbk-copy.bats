#!/usr/bin/env bats
# qbk-copy: the copier on its own, between real qemu-nbd exports named by
# NBD URIs (in a directory whose name needs percent-encoding) and into a
# local raw file. Correctness is byte-for-byte equality and equal digests.

bats_require_minimum_version 1.5.0
load helpers

setup() {
    common_setup
    D="$T/odd dir,a&b"
    mkdir "$D"
    # 24 MiB: data, a hole, zeros written out, data at the very end
    truncate -s 24M "$D/src.raw"
    head -c $((5 << 20)) /dev/urandom |
        dd of="$D/src.raw" bs=1M conv=notrunc status=none
    head -c $((3 << 20)) /dev/zero |
        dd of="$D/src.raw" bs=1M seek=12 conv=notrunc status=none
    head -c $((1 << 20)) /dev/urandom |
        dd of="$D/src.raw" bs=1M seek=23 conv=notrunc status=none
    qemu-nbd --fork --persistent --read-only -f raw --export-name=disk0 --shared=8 \
        --socket="$D/src.sock" --pid-file="$T/src.pid" "$D/src.raw"
    SRC="nbd+unix:///disk0?socket=$(uri_escape "$D/src.sock")"
}

teardown() {
    common_teardown
}

# uri_escape TEXT: TEXT percent-encoded for a URI's query
uri_escape() {
    jq -rn --arg s "$1" '$s | @uri'
}

# serve_target NAME: an empty raw image of the source's size, writable
# over NBD; its URI in $DST.
serve_target() {
    truncate -s 24M "$D/$1.raw"
    qemu-nbd --fork -f raw --cache=none --export-name="$1" \
        --socket="$D/$1.sock" --pid-file="$T/$1.pid" "$D/$1.raw"
    DST="nbd+unix:///$1?socket=$(uri_escape "$D/$1.sock")"
}

@test "an export into a raw file and into another export: exact, equal digests" {
    run -0 qbk-copy --digests "$T/a.dig" --json "$SRC" "$D/out.raw"
    cmp "$D/src.raw" "$D/out.raw"
    [ "$(stat -c %a "$D/out.raw")" = 600 ]
    [ "$(jq .size <<<"$output")" -eq $((24 << 20)) ]
    # 9 MiB allocated (zeros written out are data to a raw file): the
    # 15 MiB of holes are not read
    [ "$(jq .bytes_read <<<"$output")" -le $((9 << 20)) ]
    sum_file=$(jq -r .checksum <<<"$output")

    serve_target dst
    run -0 qbk-copy --digests "$T/b.dig" --requests 4 --connections 2 \
        "$SRC" "$DST"
    sum_nbd=$output
    kill -TERM "$(cat "$T/dst.pid")"
    wait_gone "$(cat "$T/dst.pid")"
    cmp "$D/src.raw" "$D/dst.raw"
    [ "$sum_nbd" = "$sum_file" ]
    cmp "$T/a.dig" "$T/b.dig"
}

@test "both write modes into a raw file: exact, the same digests; a bad mode is a usage error" {
    run -0 qbk-copy --digests "$T/c.dig" --write-mode cached "$SRC" "$D/cached.raw"
    sum_cached=$output
    run -0 qbk-copy --digests "$T/d.dig" --write-mode direct "$SRC" "$D/direct.raw"
    [ "$output" = "$sum_cached" ]
    cmp "$D/src.raw" "$D/cached.raw"
    cmp "$D/src.raw" "$D/direct.raw"
    cmp "$T/c.dig" "$T/d.dig"
    fails 2 "--write-mode must be cached or direct" qbk-copy --write-mode fast "$SRC" "$D/x.raw"
    [ ! -e "$D/x.raw" ]
}

@test "copier options share qbk-pull's bounds and sizes: out of bounds is a usage error, 50M a rate" {
    for args in "--requests 0" "--requests 100000000" "--connections 9" \
        "--chunk-size 1000" "--chunk-size 68719476736" "--rate-limit 0" \
        "--rate-limit 5X" "--rate-limit -5" "--x-notice-ms 0" \
        "--x-notice-radius -1"; do
        run qbk-copy $args "$SRC" "$D/x.raw"
        echo "$args: $output"
        [ "$status" -eq 2 ]
        assert_one_line_error
        [ ! -e "$D/x.raw" ]
    done
    run -0 qbk-copy --digests "$T/r.dig" --rate-limit 1G --sequential "$SRC" "$D/rated.raw"
    cmp "$D/src.raw" "$D/rated.raw"
}

@test "no URI, an unreachable export, a target of another size: one-line errors, exit 2 or 1" {
    fails 2 "is not an NBD URI" qbk-copy "$D/src.raw" "$D/out.raw"

    fails 1 "cannot open NBD export" \
        qbk-copy "nbd+unix:///disk0?socket=$(uri_escape "$D/none.sock")" "$D/out.raw"
    [ ! -e "$D/out.raw" ]

    run -1 qbk-copy "nbd+unix:///nosuch?socket=$(uri_escape "$D/src.sock")" \
        "$D/out.raw"
    assert_one_line_error
    [ ! -e "$D/out.raw" ]

    serve_target small
    kill -TERM "$(cat "$T/small.pid")"
    wait_gone "$(cat "$T/small.pid")"
    truncate -s 20M "$D/small.raw"
    qemu-nbd --fork -f raw --export-name=small --socket="$D/small.sock" \
        --pid-file="$T/small.pid" "$D/small.raw"
    fails 1 "differ in size" qbk-copy "$SRC" "$DST"
    cmp <(head -c 20M /dev/zero) "$D/small.raw"
}

@test "a server that accepts and never answers: a bounded one-line error (--timeout), not a hang" {
    port=$(free_port)
    # its own process group: the forked children and their sleep go too
    setsid socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" SYSTEM:'sleep 60' &
    echo $! >"$T/socat.pid"
    wait_for 30 listening "$port"
    fails 1 "no answer within 2000 ms" qbk-copy --timeout 2 "nbd://127.0.0.1:$port/x" "$D/out.raw"
    [ ! -e "$D/out.raw" ]
    run -2 qbk-copy --timeout 0 "nbd://127.0.0.1:$port/x" "$D/out.raw"
    kill -TERM -- "-$(cat "$T/socat.pid")"
    rm "$T/socat.pid"
    [ -z "$(pgrep -f "TCP-LISTEN:$port")" ]
}

# listening PORT: something listens on TCP PORT
listening() {
    ss -Hltn "sport = :$1" | grep -q .
}

# nbdkit_front NAME FILTER PARAMS...: nbdkit in front of the source
# export, through FILTER; its URI in $FRONT.
nbdkit_front() {
    local name=$1 filter=$2
    shift 2
    nbdkit --unix "$T/$name.sock" --pidfile "$T/$name.pid" --exportname src \
        --filter="$filter" nbd socket="$D/src.sock" export=disk0 "$@"
    wait_for 30 test -s "$T/$name.pid" -a -S "$T/$name.sock"
    FRONT="nbd+unix:///src?socket=$T/$name.sock"
}

@test "read errors from the source (nbdkit's error filter): one line, non-zero, no digests claimed; a slow source (delay filter) copies exact" {
    nbdkit_front bad error error=EIO error-pread-rate=30%
    run qbk-copy --digests "$T/bad.dig" "$FRONT" "$D/bad.raw"
    echo "$output"
    [ "$status" -eq 1 ]
    assert_one_line_error
    [[ "$output" == *"read"* ]]
    kill "$(cat "$T/bad.pid")"
    # 20 ms per request, as a far-away hypervisor: slower, and exact
    nbdkit_front slow delay delay-read=20ms
    run -0 qbk-copy --digests "$T/slow.dig" "$FRONT" "$D/slow.raw"
    cmp "$D/src.raw" "$D/slow.raw"
    run -0 qbk-copy --digests "$T/direct.dig" "$SRC" "$D/direct.raw"
    cmp "$T/slow.dig" "$T/direct.dig"
    kill "$(cat "$T/slow.pid")"
}

@test "block status asked ahead in windows, and short answers (nbdkit blocksize maxlen=64M) asked again where they stopped: exact either way" {
    # 9 GiB, 1% data in random runs: three windows of up to 4 GiB in flight
    nbdkit --unix "$T/sr.sock" --pidfile "$T/sr.pid" sparse-random \
        size=9G percent=1 seed=1234
    nbdkit --unix "$T/short.sock" --pidfile "$T/short.pid" \
        --filter=blocksize sparse-random size=9G percent=1 seed=1234 maxlen=64M
    wait_for 30 test -S "$T/sr.sock" -a -S "$T/short.sock"
    run -0 qbk-copy --json --digests "$T/whole.dig" "nbd+unix:///?socket=$T/sr.sock" "$T/whole.raw"
    whole=$output
    [ "$(jq .block_status_calls <<<"$whole")" -eq 3 ]
    run -0 qbk-copy --json --digests "$T/short.dig" "nbd+unix:///?socket=$T/short.sock" "$T/short.raw"
    short=$output
    # every answer stopped at 64 MiB: 144 questions at least, all planned
    [ "$(jq .block_status_calls <<<"$short")" -ge 144 ]
    [ "$(jq .checksum <<<"$short")" = "$(jq .checksum <<<"$whole")" ]
    [ "$(jq .bytes_read <<<"$short")" -eq "$(jq .bytes_read <<<"$whole")" ]
    # and a peer's copy of the same source agrees byte for byte
    nbdcopy "nbd+unix:///?socket=$T/sr.sock" "$T/peer.raw"
    qemu-img compare -q -f raw -F raw "$T/whole.raw" "$T/peer.raw"
    qemu-img compare -q -f raw -F raw "$T/short.raw" "$T/peer.raw"
    kill "$(cat "$T/sr.pid")" "$(cat "$T/short.pid")"
}

@test "a bitmap copy asks allocation only where the bitmap is dirty (1 TiB, three dirty places): exact, as with one connection asking both" {
    # data from before the bitmap (not to be copied), then dirty data,
    # dirty zeros written out, and dirty data at the very end
    qemu-img create -q -f qcow2 "$T/big.qcow2" 1T
    qemu-io -f qcow2 -c "write -P 7 200G 1M" "$T/big.qcow2" >/dev/null
    qemu-img bitmap --add "$T/big.qcow2" b
    dirty=("write -P 1 10G 1M" "write -z 700G 2M" "write -P 2 1023G 1M")
    qemu-img create -q -f qcow2 "$T/expected.qcow2" 1T
    for w in "${dirty[@]}"; do
        qemu-io -f qcow2 -c "$w" "$T/big.qcow2" >/dev/null
        qemu-io -f qcow2 -c "$w" "$T/expected.qcow2" >/dev/null
    done
    qemu-nbd --fork --persistent --read-only -f qcow2 -B b --shared=8 \
        --socket="$T/big.sock" --pid-file="$T/big.pid" "$T/big.qcow2"
    big="nbd+unix:///?socket=$T/big.sock"
    run -0 qbk-copy --json --bitmap b "$big" "$T/two.raw"
    two=$output
    # 256 windows asked about the bitmap; allocation only from each dirty
    # window's first dirty block to its last: 4 MiB, not 1 TiB
    [ "$(jq .block_status_calls <<<"$two")" -ge 259 ]
    [ "$(jq .allocation_asked <<<"$two")" -eq $((4 << 20)) ]
    [ "$(jq .bytes_read <<<"$two")" -eq $((2 << 20)) ]
    qemu-img compare -q -f raw -F qcow2 "$T/two.raw" "$T/expected.qcow2"
    run -0 qbk-copy --json --bitmap b --connections 1 "$big" "$T/one.raw"
    [ "$(jq .allocation_asked <<<"$output")" -eq $((1 << 40)) ]
    for k in bytes_read bytes_zero bytes_skipped; do
        [ "$(jq .$k <<<"$output")" -eq "$(jq .$k <<<"$two")" ]
    done
    qemu-img compare -q -f raw -F qcow2 "$T/one.raw" "$T/expected.qcow2"
    kill "$(cat "$T/big.pid")"
}

@test "planning ahead is bounded (--x-plan-ahead): what is held follows the bound, not the disk's extents; exact" {
    # 10 windows of block status (40 GiB), each with 64 runs of 4 KiB
    truncate -s 40G "$T/frag.raw"
    awk 'BEGIN { for (w = 0; w < 10; w++) for (i = 0; i < 64; i++)
                     printf "write -P %d %dM 4k\n", i + 1, w * 4096 + i * 32 + 5 }' |
        qemu-io -f raw "$T/frag.raw" >/dev/null
    qemu-nbd --fork --persistent --read-only -f raw --shared=8 \
        --socket="$T/frag.sock" --pid-file="$T/frag.pid" "$T/frag.raw"
    frag="nbd+unix:///?socket=$T/frag.sock"
    run -0 qbk-copy --json --x-plan-ahead 10 "$frag" "$T/frag.out"
    # at most the bound, plus the four windows asked before it was met
    # (129 regions each: 64 runs, the holes around them)
    [ "$(jq .extents <<<"$output")" -ge 1280 ]
    [ "$(jq .planned_max <<<"$output")" -le $((10 + 4 * 129)) ]
    [ "$(jq .bytes_read <<<"$output")" -eq $((640 << 16)) ]
    qemu-img compare -q -f raw -F raw "$T/frag.out" "$T/frag.raw"
    run -2 qbk-copy --x-plan-ahead 0 "$frag" "$T/zero.out"
    [[ "$output" == *"--x-plan-ahead"* ]]
    kill "$(cat "$T/frag.pid")"
}
