#!/usr/bin/env bats
# Encryption at rest: qbk-pull --encrypt --key-file makes every image of
# the repository LUKS-encrypted qcow2 (QEMU reads the passphrase from the
# file itself); the repository keeps a fingerprint of the key, never the
# key, and every command refuses a wrong or missing key before it reads
# or writes anything.

bats_require_minimum_version 1.5.0
load helpers

setup() {
    common_setup
    two_disk_vm
    head -c 32 /dev/urandom | base64 -w0 >"$T/key"
    chmod 600 "$T/key"
    # a recognisable pattern in the guest's data
    CANARY=qbk-plaintext-canary-$RANDOM$RANDOM
    yes "$CANARY" | head -c $((1 << 20)) >"$T/canary"
    guest_write_file disk0 $((6 << 20)) "$T/canary"
}

teardown() {
    common_teardown
}

# overwrite_during NAME ARGS...: a backup (scratch kept: --no-release) in
# whose scratch the guest's overwrite of the pattern puts the pattern's
# old bytes; runs CHECK (a command) while it copies, then lets it finish
overwrite_during() {
    local name=$1 check=$2
    shift 2
    start_pull "$name" --rate-limit 1M --no-release --json "$@"
    wait_fleeced "$T/progress-$name" "$PULL_PID"
    snapshot "$name" disk0 disk1
    gw disk0 $((6 << 20)) $((1 << 20)) 99
    [ -n "$(ls -A "$T/repo/.scratch")" ]
    $check
    wait "$PULL_PID" || { cat "$T/pull-$name.err"; false; }
}

# in_scratch: the pattern is in the scratch, in the clear
in_scratch() {
    [ -n "$(grep -rlF "$CANARY" "$T/repo/.scratch")" ]
}

# no_plaintext: neither the guest's pattern nor the key in any file of
# the repository
no_plaintext() {
    local found
    found=$(grep -rlF -e "$CANARY" -e "$(cat "$T/key")" "$T/repo" || true)
    if [ -n "$found" ]; then
        echo "plaintext in: $found" >&2
        return 1
    fi
}

@test "--encrypt: full and incrementals LUKS-encrypted while the guest writes; restores exact; no plaintext in any file; qemu-img opens them with the key; merge, verify, compression" {
    pull_with_writes full "disk0 disk1" --encrypt --key-file "$T/key"
    # the pattern was in the backup's data: its restore has it
    export QBK_KEY_FILE=$T/key
    restore_matches full disk0
    restore_matches full disk1
    grep -qF "$CANARY" "$T/expect-full-disk0.raw"
    no_plaintext
    full=$T/repo/$(manifest_field full disk0 image)
    [ "$(qemu-img info --output=json "$full" | jq .encrypted)" = true ]
    [ "$(qemu-img info --output=json "$full" | jq -r '."format-specific".data.encrypt.format')" = luks ]
    # the repository keeps a salted fingerprint, not the key
    [ "$(jq -r .kdf "$T/repo/key.json")" = pbkdf2-hmac-sha256 ]
    [ "$(stat -c %a "$T/repo/key.json")" = 600 ]
    # any QEMU tool opens them with the key
    qemu-img convert --object "secret,id=k,file=$T/key" -O raw \
        --image-opts "driver=qcow2,encrypt.key-secret=k,file.filename=$full" "$T/plain.raw"
    cmp "$T/plain.raw" "$T/expect-full-disk0.raw"
    rm "$T/plain.raw"
    # during a backup the guest's overwritten data waits in the scratch:
    # encrypted there too (with a passphrase of this run only)
    overwrite_during during no_plaintext
    restore_matches during disk0
    # later runs need only the key (here from $QBK_KEY_FILE)
    random_writes 4 disk0 disk1
    pull_with_writes inc1 "disk0 disk1"
    [ "$(manifest_field inc1 disk0 mode)" = incremental ]
    [ "$(qemu-img info --output=json "$T/repo/$(manifest_field inc1 disk0 image)" | jq .encrypted)" = true ]
    restore_matches inc1 disk0
    restore_matches inc1 disk1
    # compression and encryption together, and scheme A (its scratch an
    # encrypted qcow2 on the disk)
    random_writes 4 disk0 disk1
    pull_with_writes inc2 "disk0 disk1" --compress --fleece A
    [ "$(jq -r .fleece "$T/pull-inc2.json")" = A ]
    inc2=$T/repo/$(manifest_field inc2 disk0 image)
    [ "$(qemu-img info --output=json "$inc2" | jq .encrypted)" = true ]
    qemu-img check --object "secret,id=k,file=$T/key" \
        "json:{\"driver\": \"qcow2\", \"encrypt\": {\"key-secret\": \"k\"}, \"backing\": null,
               \"file\": {\"driver\": \"file\", \"filename\": \"$inc2\"}}" |
        grep -q "100.00% compressed clusters"
    restore_matches inc2 disk0
    restore_matches inc2 disk1
    run -0 qbk-verify --repo "$T/repo"
    # merged: encrypted (and compressed) still, and exact
    run -0 qbk-merge --repo "$T/repo" --from "$(jq -r .id "$T/pull-inc1.json")" \
        --to "$(jq -r .id "$T/pull-inc2.json")"
    restore_matches inc2 disk0
    restore_matches inc2 disk1
    [ "$(qemu-img info --output=json "$inc2" | jq .encrypted)" = true ]
    run -0 qbk-verify --repo "$T/repo"
    no_plaintext
    # a raw image would be plaintext: refused
    run qbk-merge --repo "$T/repo" --full-at "$(jq -r .id "$T/pull-inc2.json")" --disk disk0 --format raw
    [ "$status" -eq 2 ]
    assert_one_line_error
    run qbk-pull --repo "$T/repo" --format raw --mode full
    [ "$status" -eq 2 ]
    assert_one_line_error
    no_plaintext
    assert_clean
}

# repo_state: every file of the repository with its size and time
repo_state() {
    find "$T/repo" -printf '%p %s %T@ %m\n' | sort
}

@test "a wrong key, no key, a key open to others or not text: one line, exit 2, before anything is read or written, by pull, merge, verify and restore" {
    pull_with_writes full "disk0 disk1" --encrypt --key-file "$T/key"
    id=$(jq -r .id "$T/pull-full.json")
    head -c 32 /dev/urandom | base64 -w0 >"$T/wrong"
    chmod 600 "$T/wrong"
    cp "$T/key" "$T/open"
    chmod 644 "$T/open"
    head -c 32 /dev/urandom >"$T/binary"
    printf '\0\377' >>"$T/binary"
    chmod 600 "$T/binary"
    before=$(repo_state)
    bitmaps=$(bitmap_names disk0)
    for key in wrong open binary none; do
        k=(--key-file "$T/$key")
        [ "$key" = none ] && k=()
        for cmd in "qbk-pull --repo $T/repo" "qbk-merge --repo $T/repo --keep-daily 1" \
            "qbk-verify --repo $T/repo" \
            "qbk-restore --repo $T/repo --disk disk0 --backup $id -o $T/out.raw"; do
            # shellcheck disable=SC2086
            run $cmd "${k[@]}"
            echo "$key, $cmd: $output"
            [ "$status" -eq 2 ]
            assert_one_line_error
            case $key in
            wrong) [[ "$output" == *"is not the key of repository"* ]] ;;
            open) [[ "$output" == *"open to others"* ]] ;;
            binary) [[ "$output" == *"UTF-8"* ]] ;;
            none) [[ "$output" == *"is encrypted: give its key"* ]] ;;
            esac
        done
    done
    [ ! -e "$T/out.raw" ]
    [ "$(repo_state)" = "$before" ]
    [ "$(bitmap_names disk0)" = "$bitmaps" ]
    # listing needs no key
    run -0 qbk-restore --repo "$T/repo" --list
    # the right key still works
    random_writes 2 disk0 disk1
    pull_with_writes inc "disk0 disk1" --key-file "$T/key"
    QBK_KEY_FILE=$T/key restore_matches inc disk0
    no_plaintext
    # restore --into reads the encrypted chain too, and refuses without it
    QBK_KEY_FILE=$T/key qbk-restore --repo "$T/repo" --disk disk0 --backup "$id" -o "$T/into.raw"
    run qbk-restore --repo "$T/repo" --disk disk0 --into "$T/into.raw" --from "$id" \
        --backup "$(jq -r .id "$T/pull-inc.json")"
    [ "$status" -eq 2 ]
    run -0 qbk-restore --repo "$T/repo" --disk disk0 --into "$T/into.raw" --from "$id" \
        --backup "$(jq -r .id "$T/pull-inc.json")" --key-file "$T/key" --verify
    cmp "$T/into.raw" "$T/expect-inc-disk0.raw"
    # a run killed mid-copy leaves its scratch's passphrase in QEMU (a
    # mark); the repair removes it with the rest
    start_pull killed --key-file "$T/key" --rate-limit 1M
    wait_progress progress "$T/progress-killed" "$PULL_PID"
    [ "$(qmp qom-list '{"path": "/objects"}' | jq '[.[].name | select(startswith("qbk-k"))] | length')" -eq 1 ]
    kill -KILL "$PULL_PID"
    wait "$PULL_PID" || true
    run -0 qbk-checkpoint check --repair
    [ "$(qmp qom-list '{"path": "/objects"}' | jq '[.[].name | select(startswith("qbk-"))] | length')" -eq 0 ]
    random_writes 2 disk0 disk1
    pull_with_writes after "disk0 disk1" --key-file "$T/key"
    QBK_KEY_FILE=$T/key restore_matches after disk0
    no_plaintext
    assert_clean
}

@test "--encrypt needs --key-file, and a repository with plain backups stays plain" {
    run qbk-pull --repo "$T/repo" --encrypt
    [ "$status" -eq 2 ]
    assert_one_line_error
    [ ! -e "$T/repo" ]
    # the control for the scratch check above: a plain repository's
    # scratch holds the pattern in the clear
    overwrite_during plain in_scratch
    restore_matches plain disk0
    fails 2 "is not encrypted" qbk-pull --repo "$T/repo" --encrypt --key-file "$T/key"
    [ ! -e "$T/repo/key.json" ]
    # a key named by $QBK_KEY_FILE serves the encrypted repositories only
    QBK_KEY_FILE=$T/key run -0 qbk-verify --repo "$T/repo"
    run qbk-verify --repo "$T/repo" --key-file "$T/key"
    [ "$status" -eq 2 ]
    assert_clean
}
