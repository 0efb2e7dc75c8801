#!/usr/bin/env bats
# Live restore and serving a backup: qbk-restore --live makes an image on a
# backup's chain that a new VM starts from at once; --stream copies the
# backup into it while the guest runs (QEMU's block-stream), after which
# it stands alone; --export serves a backup read-only over NBD. The new
# VM's disk is read back over NBD and compared with the shadow model.

bats_require_minimum_version 1.5.0
load helpers
load tls

setup() {
    common_setup
    two_disk_vm
    pull_with_writes full "disk0 disk1"
    random_writes 6 disk0 disk1
    pull_with_writes inc "disk0 disk1"
    INC=$(jq -r .id "$T/pull-inc.json")
    cp "$T/expect-inc-disk0.raw" "$T/live-shadow.raw"
}

teardown() {
    common_teardown
}

# live_vm IMAGE [QEMU ARGS...]: a second VM on IMAGE (node live0, device
# vda), its monitors at $T/live.sock (qbk's) and $T/live-test.sock (the
# test's: QEMU serves one client per monitor), and an NBD export "live" of
# its disk at $T/live-nbd.sock, to read what its guest sees
live_vm() {
    local image=$1
    shift
    rm -f "$T/live.sock" "$T/live-test.sock" "$T/live-nbd.sock"
    qemu-system-x86_64 -M q35 -S -display none -nodefaults -no-user-config \
        -qmp "unix:$T/live.sock,server=on,wait=off" \
        -qmp "unix:$T/live-test.sock,server=on,wait=off" "$@" \
        -blockdev "driver=file,filename=$image,node-name=live-file" \
        -blockdev driver=qcow2,file=live-file,node-name=live0 \
        -device virtio-blk-pci,drive=live0,id=vda \
        -pidfile "$T/live.pid" -daemonize
    lq nbd-server-start "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"$T/live-nbd.sock\"}}}" >/dev/null
    lq block-export-add '{"type": "nbd", "id": "e", "node-name": "live0", "name": "live"}' >/dev/null
}

lq() {
    qbk-qmp --qmp "$T/live-test.sock" "$@"
}

# live_reads_as FILE: the new VM's disk reads exactly as FILE
live_reads_as() {
    rm -f "$T/read.raw"
    nbdcopy "nbd+unix:///live?socket=$T/live-nbd.sock" "$T/read.raw"
    cmp "$T/read.raw" "$1"
}

# live_write OFFSET LENGTH PATTERN: the new guest writes (and the shadow)
live_write() {
    local out
    out=$(lq --hmp "qemu-io -d /machine/peripheral/vda/virtio-backend \"write -P $3 $1 $2\"")
    [ -z "$out" ] || { echo "live_write: $out" >&2; return 1; }
    head -c "$2" /dev/zero | tr '\0' "\\$(printf '%03o' "$3")" |
        dd of="$T/live-shadow.raw" bs=64k seek="$1" oflag=seek_bytes conv=notrunc status=none
}

# stream_job_started: the stream has copied something
stream_job_started() {
    for _ in $(seq 200); do
        [ "$(lq query-block-jobs | jq '.[0].offset // 0')" -gt 0 ] && return 0
        sleep 0.05
    done
    lq query-block-jobs >&2
    cat "$T/stream.err" >&2
    return 1
}

repo_state() {
    find "$T/repo" -printf '%p %s %T@ %m\n' | sort
}

@test "--live then --stream: the new VM reads the backup exactly at once and while the copy runs; its writes stay; then its image stands alone" {
    before=$(repo_state)
    run -0 --separate-stderr qbk-restore --repo "$T/repo" --disk disk0 --backup "$INC" \
        --live -o "$T/live.qcow2" --json
    [ "$(jq -r .backup <<<"$output")" = "$INC" ]
    [ "$(jq .chain <<<"$output")" -eq 2 ]
    [ "$(stat -c %a "$T/live.qcow2")" = 600 ]
    # nothing copied yet: the image is tiny, its backing the repository's
    [ "$(du -k "$T/live.qcow2" | cut -f1)" -lt 1024 ]
    [[ "$(qemu-img info -U --output=json "$T/live.qcow2" | jq -r '."backing-filename"')" == json:* ]]
    live_vm "$T/live.qcow2"
    live_reads_as "$T/expect-inc-disk0.raw"
    live_write $((1 << 20)) 65536 41
    qbk-restore --stream live0 --qmp "$T/live.sock" --stream-rate 2M \
        >"$T/stream.out" 2>"$T/stream.err" &
    spid=$!
    stream_job_started
    # while the copy runs the guest reads its data and writes, also where
    # the copy has not been yet
    live_write $((40 << 20)) 131072 42
    live_write 4096 8192 43
    live_reads_as "$T/live-shadow.raw"
    wait "$spid" || { cat "$T/stream.err"; false; }
    grep -q "stands alone" "$T/stream.err"
    live_reads_as "$T/live-shadow.raw"
    live_write $((50 << 20)) 65536 44
    pid=$(cat "$T/live.pid")
    lq quit >/dev/null || true
    wait_gone "$pid"
    # the image needs the repository no more
    [ "$(qemu-img info --output=json "$T/live.qcow2" | jq -r '."backing-filename" // "none"')" = none ]
    qemu-img convert -O raw "$T/live.qcow2" "$T/final.raw"
    cmp "$T/final.raw" "$T/live-shadow.raw"
    # the repository was never written
    [ "$(repo_state)" = "$before" ]
    assert_clean
}

@test "a stream cancelled, or cut short by its QEMU's death: the image stays valid on the backup; streaming again goes on to the end" {
    qbk-restore --repo "$T/repo" --disk disk0 --live -o "$T/live.qcow2"
    live_vm "$T/live.qcow2"
    qbk-restore --stream live0 --qmp "$T/live.sock" --stream-rate 1M --quiet \
        >/dev/null 2>"$T/stream.err" &
    spid=$!
    stream_job_started
    kill -TERM "$spid"
    rc=0
    wait "$spid" || rc=$?
    cat "$T/stream.err"
    [ "$rc" -eq 1 ]
    [ "$(grep -c . "$T/stream.err")" -eq 1 ]
    grep -q "cancelled: the image still stands on the backup" "$T/stream.err"
    [ "$(lq query-block-jobs | jq length)" -eq 0 ]
    live_reads_as "$T/expect-inc-disk0.raw"
    # again, and QEMU dies under it
    qbk-restore --stream live0 --qmp "$T/live.sock" --stream-rate 1M --quiet \
        >/dev/null 2>"$T/stream.err" &
    spid=$!
    stream_job_started
    kill -KILL "$(cat "$T/live.pid")"
    rc=0
    wait "$spid" || rc=$?
    [ "$rc" -eq 1 ]
    [ "$(grep -c . "$T/stream.err")" -eq 1 ]
    # a valid image (leaked clusters at most: qemu-img check exit 0 or 3)
    rc=0
    qemu-img check "$T/live.qcow2" >/dev/null || rc=$?
    [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ]
    live_vm "$T/live.qcow2"
    live_reads_as "$T/expect-inc-disk0.raw"
    run -0 qbk-restore --stream live0 --qmp "$T/live.sock"
    live_reads_as "$T/expect-inc-disk0.raw"
    pid=$(cat "$T/live.pid")
    lq quit >/dev/null || true
    wait_gone "$pid"
    [ "$(qemu-img info --output=json "$T/live.qcow2" | jq -r '."backing-filename" // "none"')" = none ]
    # usage errors
    QBK_QMP= run qbk-restore --stream live0
    [ "$status" -eq 2 ]
    run qbk-restore --repo "$T/repo" --disk disk0 --live
    [ "$status" -eq 2 ]
    # never over an existing file
    run qbk-restore --repo "$T/repo" --disk disk0 --live -o "$T/live.qcow2"
    [ "$status" -eq 1 ]
    assert_one_line_error
    assert_clean
}

@test "--export: any NBD client reads a backup from a unix socket, or over TLS with a certificate of the CA; SIGTERM stops it, nothing left" {
    qbk-restore --repo "$T/repo" --disk disk0 --backup "$INC" --export "$T/exp.sock" \
        >"$T/exp.out" 2>"$T/exp.err" &
    epid=$!
    wait_for 30 test -s "$T/exp.out"
    uri=$(cat "$T/exp.out")
    [[ "$uri" == nbd+unix:///disk0?socket=* ]]
    nbdcopy "$uri" "$T/exported.raw"
    cmp "$T/exported.raw" "$T/expect-inc-disk0.raw"
    # a second client, and the backup's allocation depth is there
    run -0 nbdinfo --map=qemu:allocation-depth "$uri"
    kill -TERM "$epid"
    wait "$epid"
    [ ! -e "$T/exp.sock" ]
    # over TCP with TLS
    PKI_SERVER_IP=127.0.0.1 make_pki
    port=$(free_port)
    qbk-restore --repo "$T/repo" --disk disk1 --export "127.0.0.1:$port" \
        --tls-creds "$T/pki/server" >"$T/exp-tls.out" 2>"$T/exp-tls.err" &
    epid=$!
    # (a file of its own: the first export's URI must not pass for its own)
    wait_for 30 test -s "$T/exp-tls.out"
    [ "$(cat "$T/exp-tls.out")" = "nbds://127.0.0.1:$port/disk1" ]
    nbdcopy "nbds://127.0.0.1:$port/disk1?tls-certificates=$T/pki/client" "$T/exported1.raw"
    cmp "$T/exported1.raw" "$T/expect-inc-disk1.raw"
    run ! nbdcopy "nbd://127.0.0.1:$port/disk1" "$T/no.raw"
    run ! nbdcopy "nbds://127.0.0.1:$port/disk1?tls-certificates=$T/pki/wrong-ca" "$T/no.raw"
    kill -INT "$epid"
    wait "$epid"
    # plain TCP only when asked for
    run qbk-restore --repo "$T/repo" --disk disk1 --export "127.0.0.1:$port"
    [ "$status" -eq 2 ]
    assert_one_line_error
    assert_clean
}
