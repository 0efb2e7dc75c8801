#!/usr/bin/env bats
# qbk against a QEMU reached over the network: QMP over TLS with client
# certificates (tls:HOST:PORT, --tls-creds), each refusal a one-line
# error that leaves the VM untouched. Certificates are made per test.

bats_require_minimum_version 1.5.0
load helpers
load tls

setup() {
    common_setup
    make_pki
    PORT=$(free_port)
    PLAIN_PORT=$(free_port)
    # shellcheck disable=SC2046
    start_vm $(tls_monitor_args "$PORT") \
        -qmp "tcp:127.0.0.1:$PLAIN_PORT,server=on,wait=off" -name qbk-test-vm
    # "the hypervisor's" scratch directory, the operator's
    mkdir -m 700 "$T/hv-scratch"
    shadow_init disk0 disk1
    gw disk0 0 1048576 17
    gw disk1 $((5 << 20)) 2097152 51
}

teardown() {
    common_teardown
}

@test "QMP over TLS: checkpoints and backups through tls:HOST:PORT with a client certificate; restores exact" {
    export QBK_QMP=tls:localhost:$PORT
    run -0 qbk-checkpoint --tls-creds "$T/pki/client" disks
    [[ "$output" == *disk0* ]]
    export QBK_TLS_CREDS=$T/pki/client
    run -0 qbk-qmp query-status
    pull_with_writes full "disk0 disk1"
    restore_matches full disk0
    restore_matches full disk1
    random_writes 4 disk0 disk1
    pull_with_writes inc "disk0 disk1"
    [ "$(manifest_field inc disk0 mode)" = incremental ]
    restore_matches inc disk0
    restore_matches inc disk1
    run -0 qbk-checkpoint list
    [ "$(qbk-checkpoint list --json | jq '.checkpoints | length')" -eq 2 ]
    assert_clean
}

@test "refused over the network, one line each, nothing changed: wrong CA, another CA's client, an expired client, no credentials, plain TCP to TLS and back" {
    before=$(qmp query-named-block-nodes '{"flat": true}' | jq -c '[.[]."dirty-bitmaps"]')
    try() {
        run qbk-checkpoint --timeout 3 "$@" create
        echo "$*: $output"
        [ "$status" -eq 1 ]
        assert_one_line_error
    }
    # the server's certificate is not signed by the CA we trust
    try --qmp "tls:localhost:$PORT" --tls-creds "$T/pki/wrong-ca"
    [[ "$output" == *"TLS with 'tls:localhost:$PORT' failed: the server's certificate is not signed by the CA in ca-cert.pem"* ]]
    # QEMU does not trust our certificate (verify-peer)
    try --qmp "tls:localhost:$PORT" --tls-creds "$T/pki/stranger"
    [[ "$output" == *"refused our client certificate"* ]]
    try --qmp "tls:localhost:$PORT" --tls-creds "$T/pki/expired"
    [[ "$output" == *"refused our client certificate"* ]]
    # the certificate does not name the host we asked for (localhost only)
    try --qmp "tls:127.0.0.1:$PORT" --tls-creds "$T/pki/client"
    [[ "$output" == *"TLS with 'tls:127.0.0.1:$PORT' failed: the server's certificate does not name '127.0.0.1'"* ]]
    # no credentials, or an empty directory
    try --qmp "tls:localhost:$PORT"
    [[ "$output" == *"needs TLS credentials"* ]]
    mkdir "$T/empty"
    try --qmp "tls:localhost:$PORT" --tls-creds "$T/empty"
    [[ "$output" == *"no ca-cert.pem in the TLS credentials directory"* ]]
    # plain TCP to the TLS monitor, TLS to a plain one
    try --qmp "tcp:127.0.0.1:$PORT"
    try --qmp "tls:localhost:$PLAIN_PORT" --tls-creds "$T/pki/client"
    [ "$(qmp query-named-block-nodes '{"flat": true}' | jq -c '[.[]."dirty-bitmaps"]')" = "$before" ]
    # and the right credentials still work after all that
    run -0 qbk-checkpoint --qmp "tls:localhost:$PORT" --tls-creds "$T/pki/client" list
    assert_clean
}

# serve_tls_nbd NAME FILE PORT [verify-peer]: qemu-nbd serving FILE as
# export NAME on 127.0.0.1:PORT with TLS (client certificates required).
serve_tls_nbd() {
    qemu-nbd --fork --pid-file="$T/$1.pid" -f raw -x "$1" -e 8 -t -b 127.0.0.1 -p "$3" \
        --object "tls-creds-x509,id=nbdtls0,dir=$T/pki/server,endpoint=server,verify-peer=on" \
        --tls-creds nbdtls0 "$2"
}

@test "NBD over TLS: qbk-copy reads and writes nbds:// exports with the client's certificates; each refusal one line" {
    head -c $((8 << 20)) /dev/urandom >"$T/src.raw"
    truncate -s 8M "$T/dst.raw"
    sport=$(free_port)
    dport=$(free_port)
    serve_tls_nbd src "$T/src.raw" "$sport"
    serve_tls_nbd dst "$T/dst.raw" "$dport"
    run -0 qbk-copy --tls-creds "$T/pki/client" --digests "$T/a.dig" \
        "nbds://localhost:$sport/src" "nbds://localhost:$dport/dst"
    kill -TERM "$(cat "$T/dst.pid")"
    wait_gone "$(cat "$T/dst.pid")"
    cmp "$T/src.raw" "$T/dst.raw"
    # into a local file, from the TLS export
    QBK_TLS_CREDS=$T/pki/client run qbk-copy "nbds://localhost:$sport/src" "$T/out.raw"
    echo "$output"
    [ "$status" -eq 0 ]
    cmp "$T/src.raw" "$T/out.raw"
    for args in "--tls-creds $T/pki/wrong-ca nbds://localhost:$sport/src" \
        "--tls-creds $T/pki/stranger nbds://localhost:$sport/src" \
        "--tls-creds $T/pki/expired nbds://localhost:$sport/src" \
        "nbds://localhost:$sport/src" \
        "nbd://localhost:$sport/src"; do
        # shellcheck disable=SC2086
        run qbk-copy $args "$T/no.raw"
        echo "$args: $output"
        [ "$status" -eq 1 ]
        assert_one_line_error
        [ ! -e "$T/no.raw" ]
    done
    kill -TERM "$(cat "$T/src.pid")"
    wait_gone "$(cat "$T/src.pid")"
}

@test "a remote pull: QMP over TLS, exports on TCP with TLS that only our identity may open; full and incremental exact" {
    export QBK_QMP=tls:localhost:$PORT QBK_TLS_CREDS=$T/pki/client
    nport=$(free_port)
    pull_with_writes full "disk0 disk1" --nbd-listen "localhost:$nport" \
        --scratch-dir "$T/hv-scratch"
    restore_matches full disk0
    restore_matches full disk1
    # over a network the copier keeps more requests in flight
    [ "$(manifest_field full disk0 copier | jq .requests)" -eq 128 ]
    random_writes 4 disk0 disk1
    gw disk0 $((30 << 20)) $((4 << 20)) 77
    # slowed: while it copies, another identity of the same CA is refused
    start_pull inc --nbd-listen "localhost:$nport" --scratch-dir "$T/hv-scratch" \
        --rate-limit 1M --json
    wait_fleeced "$T/progress-inc" "$PULL_PID"
    snapshot inc disk0 disk1
    # the exports are up once the copy reports progress
    wait_copying "$T/progress-inc" "$PULL_PID"
    run qbk-copy --tls-creds "$T/pki/intruder" "nbds://localhost:$nport/disk0" "$T/stolen.raw"
    echo "$output"
    [ "$status" -eq 1 ]
    assert_one_line_error
    [[ "$output" != *"Connection refused"* ]]
    [ ! -e "$T/stolen.raw" ]
    run qbk-copy "nbd://localhost:$nport/disk0" "$T/stolen.raw"
    echo "$output"
    [ "$status" -eq 1 ]
    [[ "$output" == *"requires TLS"* ]]
    kill -0 "$PULL_PID"
    random_writes 4 disk0 disk1
    wait "$PULL_PID" || { cat "$T"/pull-inc.err; false; }
    [ "$(manifest_field inc disk0 mode)" = incremental ]
    restore_matches inc disk0
    restore_matches inc disk1
    # QEMU made one scratch file per disk there, reused by every run
    [ "$(ls "$T/hv-scratch")" = "$(printf 'qbk-qbk-test-vm-disk0.scratch\nqbk-qbk-test-vm-disk1.scratch\nqbk-qbk-test-vm-disk2.scratch')" ]
    [ -z "$(ls -A "$T/repo/.scratch" 2>/dev/null)" ]
    # the server, its exports and the authz are gone
    [ "$(qmp query-block-exports | jq length)" -eq 0 ]
    [ "$(qmp qom-list '{"path": "/objects"}' | jq '[.[].name | select(startswith("qbk-"))] | length')" -eq 0 ]
    run qbk-copy --tls-creds "$T/pki/client" "nbds://localhost:$nport/disk0" "$T/late.raw"
    [ "$status" -eq 1 ]
    # usage errors before anything is touched
    run qbk-pull --repo "$T/repo" --nbd-listen "localhost:$nport" --tls-creds ""
    [ "$status" -eq 2 ]
    QBK_TLS_CREDS= run qbk-pull --repo "$T/repo" --nbd-listen "localhost:$nport" \
        --scratch-dir "$T/hv-scratch"
    [ "$status" -eq 2 ]
    [[ "$output" == *"--nbd-listen needs --tls-creds"* ]]
    run qbk-pull --repo "$T/repo" --insecure
    [ "$status" -eq 2 ]
    run qbk-pull --repo "$T/repo" --nbd-listen "localhost:$nport"
    [ "$status" -eq 2 ]
    [[ "$output" == *"--nbd-listen needs --scratch-dir"* ]]
    assert_clean
}

@test "--export-only on a remote QEMU: a TLS NBD client reads the point in time and its bitmap (scheme A, its qcow2 scratch made by QEMU); commit keeps the checkpoint" {
    export QBK_QMP=tls:localhost:$PORT QBK_TLS_CREDS=$T/pki/client
    nport=$(free_port)
    qbk-checkpoint create base
    gw disk0 $((8 << 20)) 131072 77
    start_export one --since base --nbd-listen "localhost:$nport" --scratch-dir "$T/hv-scratch"
    snapshot one disk0
    random_writes 3 disk0 # after the point in time: not exported
    uri=$(jq -r '.exports[] | select(.disk=="disk0") | .uri' "$T/export-one.json")
    ctx=$(jq -r '.exports[] | select(.disk=="disk0") | .bitmap_context' "$T/export-one.json")
    [ "$uri" = "nbds://localhost:$nport/disk0" ]
    # QEMU made a qcow2 scratch per disk on its host (scheme A's scratch
    # reads through to the disk)
    [ "$(qemu-img info -U --output=json "$T/hv-scratch/qbk-qbk-test-vm-disk0.scratch" | jq -r .format)" = qcow2 ]
    # libnbd's own tools, with the backup host's certificates
    run -0 nbdinfo --map="$ctx" "$uri?tls-certificates=$T/pki/client"
    [ "$(awk '$3 == 1 { n += $2 } END { print n }' <<<"$output")" -eq 131072 ]
    [ "$(awk '$3 == 1 { print $1 }' <<<"$output")" -eq $((8 << 20)) ]
    nbdcopy "$uri?tls-certificates=$T/pki/client" "$T/exported.raw"
    cmp "$T/exported.raw" "$T/expect-one-disk0.raw"
    # another identity of the same CA, and plain NBD, are refused
    run ! nbdcopy "$uri?tls-certificates=$T/pki/intruder" "$T/stolen.raw"
    run ! nbdcopy "nbd://localhost:$nport/disk0" "$T/stolen.raw"
    [ ! -s "$T/stolen.raw" ]
    echo commit >&7
    exec 7>&-
    wait "$EXPORT_PID"
    [ "$(qmp query-block-exports | jq length)" -eq 0 ]
    [ "$(qmp query-jobs | jq length)" -eq 0 ]
    [ "$(qmp qom-list '{"path": "/objects"}' | jq '[.[].name | select(startswith("qbk-"))] | length')" -eq 0 ]
    [ "$(qbk-checkpoint list --json | jq '.checkpoints | length')" -eq 2 ]
    # the next run is scheme B in the same files, now raw again
    pull_with_writes inc "disk0 disk1" --nbd-listen "localhost:$nport" --scratch-dir "$T/hv-scratch"
    [ "$(manifest_field inc disk0 mode)" = full ]
    restore_matches inc disk0
    assert_clean
}

@test "two VMs backed up at once from one backup host: one VM dying mid-copy fails its own backup with one line; the other's completes exact" {
    export QBK_QMP=tls:localhost:$PORT QBK_TLS_CREDS=$T/pki/client
    nport=$(free_port)
    # a second VM, on its own images, with 16 MiB of data
    mkdir "$T/vm2"
    qemu-img create -q -f qcow2 "$T/vm2/disk0.qcow2" "$DISK_SIZE"
    qemu-img create -q -f qcow2 "$T/vm2/disk1.qcow2" "$DISK_SIZE"
    qemu-img create -q -f raw "$T/vm2/disk2.raw" 16M
    qemu-io -f qcow2 -c "write -P 9 0 16M" "$T/vm2/disk0.qcow2" >/dev/null
    run_vm vm2- "$T/vm2" disk0-fmt -pidfile "$T/vm2.pid" -name vm2
    qbk-pull --qmp "$T/vm2-qmp.sock" --repo "$T/repo2" --rate-limit 1M \
        >/dev/null 2>"$T/vm2.err" &
    vm2_pull=$!
    # the first VM's backup, over TLS, while the second's copies
    start_pull vm1 --nbd-listen "localhost:$nport" --scratch-dir "$T/hv-scratch" \
        --rate-limit 4M --json
    wait_fleeced "$T/progress-vm1" "$PULL_PID"
    snapshot vm1 disk0 disk1
    random_writes 3 disk0 disk1
    kill -0 "$vm2_pull"
    # the second VM dies
    kill -KILL "$(cat "$T/vm2.pid")"
    rc=0
    wait "$vm2_pull" || rc=$?
    cat "$T/vm2.err"
    [ "$rc" -eq 1 ]
    [ "$(grep -c . "$T/vm2.err")" -eq 1 ]
    wait "$PULL_PID" || { cat "$T/pull-vm1.err"; false; }
    restore_matches vm1 disk0
    restore_matches vm1 disk1
    grep -q "QEMU went away" "$T/vm2.err"
    # the second repository holds no backup
    [ "$(qbk-restore --repo "$T/repo2" --list --json | jq length)" -eq 0 ]
    assert_clean
}

@test "a remote pull into an encrypted repository: QEMU makes LUKS scratch files on its host; full and incremental exact" {
    export QBK_QMP=tls:localhost:$PORT QBK_TLS_CREDS=$T/pki/client
    nport=$(free_port)
    head -c 32 /dev/urandom | base64 -w0 >"$T/key"
    chmod 600 "$T/key"
    pull_with_writes full "disk0 disk1" --nbd-listen "localhost:$nport" \
        --scratch-dir "$T/hv-scratch" --encrypt --key-file "$T/key"
    # the scratch QEMU made on its host is a LUKS image
    [ "$(head -c 4 "$T/hv-scratch/qbk-qbk-test-vm-disk0.scratch")" = LUKS ]
    random_writes 4 disk0 disk1
    pull_with_writes inc "disk0 disk1" --nbd-listen "localhost:$nport" \
        --scratch-dir "$T/hv-scratch" --key-file "$T/key"
    [ "$(manifest_field inc disk0 mode)" = incremental ]
    export QBK_KEY_FILE=$T/key
    restore_matches full disk0
    restore_matches inc disk0
    restore_matches inc disk1
    [ "$(qmp qom-list '{"path": "/objects"}' | jq '[.[].name | select(startswith("qbk-"))] | length')" -eq 0 ]
    assert_clean
}
