# Helpers for qbk's bats tests: every test gets its own temp dir and its own
# QEMU, and teardown kills whatever it started, even when the test failed.
#
# QBK_BIN: directory holding the qbk binaries (default: build-test/cmd).

QBK_BIN=${QBK_BIN:-$(cd "$BATS_TEST_DIRNAME/.." && pwd)/build-test/cmd}
export PATH="$QBK_BIN:$PATH"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

DISK_SIZE=${DISK_SIZE:-64M}

# shellcheck source=tests/net.bash
. "$BATS_TEST_DIRNAME/net.bash"

common_setup() {
    T=$(mktemp -d "${BATS_TMPDIR:-/tmp}/qbk-test.XXXXXX")
    export QBK_QMP="$T/qmp.sock"
    # qbk's private directories (sockets, logs) go here, so that each test
    # can tell what qbk left behind
    mkdir -m 700 "$T/tmp"
    export TMPDIR="$T/tmp"
}

# assert_no_private_dirs: every qbk process is done; none left a private
# directory (a killed one's are removed by the next qbk command).
assert_no_private_dirs() {
    if [ -n "$(ls -A "$T/tmp" 2>/dev/null)" ]; then
        echo "left in TMPDIR:" >&2
        ls -la "$T/tmp" >&2
        return 1
    fi
}

# Stop every process whose pid file is in $T, then remove $T. Fails the
# test if a qbk process or daemon of this test was still running.
common_teardown() {
    local pidfile pid i leftover=0
    [ -n "${T:-}" ] && [ -d "$T" ] || return 0
    if pgrep -f "qbk-(pull|merge|verify|restore|copy|checkpoint).*$T" >/dev/null ||
        pgrep -f "qemu-(storage-daemon|nbd).*($T/repo|$T/tmp)" >/dev/null; then
        echo "teardown: qbk processes were still running:" >&2
        pgrep -af "(qbk-|qemu-storage-daemon|qemu-nbd).*$T" >&2
        leftover=1
    fi
    for pidfile in "$T"/*.pid; do
        [ -e "$pidfile" ] || continue
        pid=$(cat "$pidfile" 2>/dev/null) || continue
        [ -n "$pid" ] || continue
        kill -TERM "$pid" 2>/dev/null || continue
        for i in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    pkill -KILL -f "qbk-(pull|merge|verify|restore|copy|checkpoint).*$T" 2>/dev/null || true
    pkill -KILL -f "qemu-(storage-daemon|nbd).*$T" 2>/dev/null || true
    # what a test's last qbk command left in its TMPDIR (a killed one's
    # private directories are removed by the next qbk command)
    if [ "$leftover" -eq 0 ] && ! assert_no_private_dirs; then
        leftover=1
    fi
    rm -rf "$T"
    return "$leftover"
}

# The default per-test set-up and tear-down (a file that needs more
# defines its own, calling these).
setup() {
    common_setup
}

teardown() {
    common_teardown
}

# make_images: two qcow2 disks, one raw disk, in $T.
make_images() {
    qemu-img create -q -f qcow2 "$T/disk0.qcow2" "$DISK_SIZE"
    qemu-img create -q -f qcow2 "$T/disk1.qcow2" "$DISK_SIZE"
    qemu-img create -q -f raw "$T/disk2.raw" 16M
}

# run_vm PREFIX DIR NODE [EXTRA QEMU ARGS...]: start QEMU paused, no guest
# OS, on the images of make_images in DIR. PREFIXqmp.sock is for qbk's
# tools, PREFIXtest.sock for the test itself (QEMU serves one client per
# monitor). disk0 is a -blockdev with format node NODE, disk1 a -drive
# (auto-named node), disk2 raw, plus an empty CD-ROM drive.
run_vm() {
    local prefix=$1 dir=$2 node=$3
    shift 3
    rm -f "$T/${prefix}qmp.sock" "$T/${prefix}test.sock"
    # in network namespace $VM_NETNS, if set (the hypervisor of a test)
    ${VM_NETNS:+ip netns exec "$VM_NETNS"} \
        qemu-system-x86_64 -M q35 -S -display none -nodefaults -no-user-config \
        -qmp "unix:$T/${prefix}qmp.sock,server=on,wait=off" \
        -qmp "unix:$T/${prefix}test.sock,server=on,wait=off" \
        -blockdev "driver=file,filename=$dir/disk0.qcow2,node-name=disk0-file" \
        -blockdev "driver=qcow2,file=disk0-file,node-name=$node" \
        -device "virtio-blk-pci,drive=$node,id=disk0" \
        -drive "file=$dir/disk1.qcow2,format=qcow2,if=none,id=drive1" \
        -device virtio-blk-pci,drive=drive1,id=disk1 \
        -drive "file=$dir/disk2.raw,format=raw,if=none,id=drive2" \
        -device virtio-blk-pci,drive=drive2,id=disk2 \
        -drive if=none,id=cd0,media=cdrom -device ide-cd,drive=cd0,bus=ide.0 \
        -daemonize "$@"
}

# launch_vm [EXTRA QEMU ARGS...]: the test's VM (qmp.sock, test.sock,
# qemu.pid).
launch_vm() {
    run_vm "" "$T" disk0-fmt -pidfile "$T/qemu.pid" "$@"
}

start_vm() {
    make_images
    launch_vm "$@"
}

# stop_vm: shut QEMU down cleanly (bitmaps are written to the images).
stop_vm() {
    local pid
    pid=$(cat "$T/qemu.pid")
    qmp quit >/dev/null 2>&1 || true
    wait_gone "$pid"
}

# kill_vm: kill -9, as a crash would.
kill_vm() {
    local pid
    pid=$(cat "$T/qemu.pid")
    kill -KILL "$pid"
    wait_gone "$pid"
}

# wait_for SECONDS CMD...: until CMD succeeds, asking every 50 ms; after
# SECONDS, fails and says what it waited for. (A loaded CI host starts a
# process in seconds, not in the tenths a quiet one takes.)
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        if ((SECONDS >= deadline)); then
            echo "waited in vain for: $*" >&2
            return 1
        fi
        sleep 0.05
    done
}

wait_gone() {
    local i
    for i in $(seq 100); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    echo "process $1 did not exit" >&2
    return 1
}

qmp() {
    qbk-qmp --qmp "$T/test.sock" "$@"
}

# guest_write DISK OFFSET LENGTH [PATTERN]: a write through the device, as
# the guest would do it (HMP qemu-io on the qdev).
guest_write() {
    local out
    out=$(qmp --hmp \
        "qemu-io -d /machine/peripheral/$1/virtio-backend \"write -P ${4:-0x5a} $2 $3\"")
    if [ -n "$out" ]; then
        echo "guest_write: $out" >&2
        return 1
    fi
}

# node_of DISK: the format node of a disk.
node_of() {
    qbk-checkpoint disks --json | jq -er --arg d "$1" \
        '.disks[] | select(.disk == $d) | .node'
}

# bitmap_sha DISK BITMAP: QEMU's hash of the bitmap's content.
bitmap_sha() {
    qmp x-debug-block-dirty-bitmap-sha256 \
        "{\"node\": \"$(node_of "$1")\", \"name\": \"$2\"}" | jq -er .sha256
}

# bitmap_field DISK BITMAP FIELD: one field of QEMU's own view of a bitmap.
bitmap_field() {
    local node
    node=$(node_of "$1")
    qmp query-named-block-nodes '{"flat": true}' | jq -er \
        --arg n "$node" --arg b "$2" --arg f "$3" \
        '.[] | select(."node-name" == $n) | ."dirty-bitmaps"[] |
         select(.name == $b) | .[$f]'
}

# bitmap_names DISK: the named bitmaps of a disk, sorted, one a line.
bitmap_names() {
    local node
    node=$(node_of "$1")
    qmp query-named-block-nodes '{"flat": true}' | jq -r --arg n "$node" \
        '.[] | select(."node-name" == $n) | ."dirty-bitmaps"[]? |
         select(.name) | .name' | sort
}

# ckpt_count CHECKPOINT DISK: dirty bytes as qbk-checkpoint lists them.
ckpt_count() {
    qbk-checkpoint list --json | jq -er --arg c "$1" --arg d "$2" \
        '.checkpoints[] | select(.name == $c) | .disks[] |
         select(.disk == $d) | .dirty_bytes'
}

# One line on stderr, nothing on stdout: what every failure must look like.
assert_one_line_error() {
    [ "$status" -ne 0 ]
    [ "${#lines[@]}" -eq 1 ]
    [[ "${lines[0]}" == qbk-* ]]
}

# fails STATUS TEXT CMD...: run CMD; it must exit with STATUS and print
# one line, a qbk command's error, that holds TEXT. $status and $output
# stay set for more checks.
fails() {
    local want=$1 text=$2
    shift 2
    run "$@"
    if [ "$status" -ne "$want" ]; then
        echo "exit status $status, not $want: $output" >&2
        return 1
    fi
    assert_one_line_error
    if [[ "$output" != *"$text"* ]]; then
        echo "'$text' is not in: $output" >&2
        return 1
    fi
}

# ---- the shadow model: what each disk must contain ----
#
# Every guest write goes to the VM and to $T/shadow-DISK.raw. At a backup's
# fleece point the shadows are saved; the backup restored must equal them.

shadow_init() {
    local d
    for d in "$@"; do
        truncate -s "$DISK_SIZE" "$T/shadow-$d.raw"
    done
}

# gw DISK OFFSET LENGTH PATTERN: guest write of bytes PATTERN (0-255)
gw() {
    guest_write "$1" "$2" "$3" "$4"
    head -c "$3" /dev/zero | tr '\0' "\\$(printf '%03o' "$4")" |
        dd of="$T/shadow-$1.raw" bs=64k seek="$2" oflag=seek_bytes \
            conv=notrunc status=none
}

# guest_write_file DISK OFFSET FILE: FILE's bytes written through the
# device at OFFSET, and into the shadow
guest_write_file() {
    local out
    out=$(qmp --hmp "qemu-io -d /machine/peripheral/$1/virtio-backend \"write -s $3 $2 $(stat -c %s "$3")\"")
    [ -z "$out" ] || { echo "guest_write_file: $out" >&2; return 1; }
    dd if="$3" of="$T/shadow-$1.raw" bs=64k seek="$2" oflag=seek_bytes conv=notrunc status=none
}

# random_writes N DISK...: N writes of 4-256 KiB at random 4 KiB offsets.
random_writes() {
    local n=$1 i d off len pat size
    shift
    size=$(stat -c %s "$T/shadow-$1.raw")
    for i in $(seq "$n"); do
        for d in "$@"; do
            len=$(( (RANDOM % 64 + 1) * 4096 ))
            off=$(( (RANDOM * 32768 + RANDOM) % ((size - len) / 4096) * 4096 ))
            pat=$(( RANDOM % 255 + 1 ))
            gw "$d" "$off" "$len" "$pat"
        done
    done
}

# snapshot NAME DISK...: save the shadows as the expected content.
snapshot() {
    local name=$1 d
    shift
    for d in "$@"; do
        cp --sparse=always "$T/shadow-$d.raw" "$T/expect-$name-$d.raw"
    done
}

# shadow_from_images DISK...: after a crash QEMU may have lost unflushed
# writes; the shadows become what the images really hold.
shadow_from_images() {
    local d
    for d in "$@"; do
        qemu-img convert -U -O raw "$T/$d.qcow2" "$T/shadow-$d.raw"
    done
}

# wait_progress EVENT PROGRESS-FILE PID: until qbk-pull PID reported EVENT
# on its --progress-fd, or has already ended (bounded, 30 s).
wait_progress() {
    local i
    for i in $(seq 600); do
        if grep -q "\"event\": \"$1\"" "$2" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$3" 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "qbk-pull did not report '$1'" >&2
    return 1
}

# wait_fleeced PROGRESS-FILE PID: its point in time is fixed before the
# caller writes again.
wait_fleeced() {
    wait_progress fleeced "$@"
}

# wait_copying PROGRESS-FILE PID: it reported copy progress, so its exports
# are all up.
wait_copying() {
    wait_progress progress "$@"
}

# start_pull NAME ARGS...: qbk-pull in the background ($PULL_PID), fleece
# point reported to $T/progress-NAME.
start_pull() {
    local name=$1
    shift
    # in network namespace $PULL_NETNS, if set (ip execs qbk-pull: its pid)
    ${PULL_NETNS:+ip netns exec "$PULL_NETNS"} \
        qbk-pull --repo "$T/repo" --progress-fd 3 "$@" 3>"$T/progress-$name" \
        >"$T/pull-$name.json" 2>"$T/pull-$name.err" &
    PULL_PID=$!
}

# start_export NAME ARGS...: qbk-pull --export-only, its stdin on fd 7.
start_export() {
    mkfifo "$T/ctl-$1"
    qbk-pull --repo "$T/repo" --export-only --json --quiet "${@:2}" \
        <"$T/ctl-$1" >"$T/export-$1.json" 2>"$T/export-$1.err" &
    EXPORT_PID=$!
    exec 7>"$T/ctl-$1"
    for i in $(seq 200); do
        [ -s "$T/export-$1.json" ] && return 0
        kill -0 "$EXPORT_PID" 2>/dev/null || break
        sleep 0.05
    done
    cat "$T/export-$1.err" >&2
    return 1
}

# pull_with_writes NAME DISKS ARGS...: start qbk-pull slowed down, and once
# it fleeced, snapshot the shadows and write during the copy.
pull_with_writes() {
    local name=$1 disks=$2 rc=0
    shift 2
    start_pull "$name" --rate-limit 8M --json "$@"
    local pid=$PULL_PID
    wait_fleeced "$T/progress-$name" "$pid"
    # shellcheck disable=SC2086
    snapshot "$name" $disks
    # shellcheck disable=SC2086
    random_writes 6 $disks
    wait "$pid" || rc=$?
    if [ "$rc" -ne 0 ]; then
        cat "$T/pull-$name.err" >&2
    fi
    return "$rc"
}

# two_disk_vm: a VM with disk0 and disk1, their shadows, and a few known
# writes on each.
two_disk_vm() {
    start_vm
    shadow_init disk0 disk1
    gw disk0 0 $((4 << 20)) 17
    gw disk1 $((5 << 20)) 2097152 51
}

# backup_chain INCS WRITES: a full backup of disk0 and disk1, then INCS
# incrementals with WRITES random writes before each (and writes during
# every copy). Their ids: $FULL, $INC1 ... $INC<INCS>.
backup_chain() {
    local n
    pull_with_writes full "disk0 disk1"
    FULL=$(jq -r .id "$T/pull-full.json")
    for ((n = 1; n <= $1; n++)); do
        random_writes "$2" disk0 disk1
        pull_with_writes "inc$n" "disk0 disk1"
        printf -v "INC$n" %s "$(jq -r .id "$T/pull-inc$n.json")"
    done
}

# restore_matches NAME DISK [BACKUP-ID]: restore and compare byte by byte.
restore_matches() {
    local id=${3:-$(jq -r .id "$T/pull-$1.json")}
    qbk-restore --repo "$T/repo" --disk "$2" --backup "$id" \
        -o "$T/restored-$1-$2.raw"
    cmp "$T/restored-$1-$2.raw" "$T/expect-$1-$2.raw"
    rm -f "$T/restored-$1-$2.raw"
}

# assert_clean: nothing of qbk's left in QEMU, in the scratch dir, or running.
assert_clean() {
    [ "$(qmp query-jobs | jq length)" -eq 0 ]
    [ "$(qmp query-block-exports | jq length)" -eq 0 ]
    [ "$(qmp query-named-block-nodes '{"flat": true}' |
        jq '[.[] | select(."node-name" | startswith("qbk-"))] | length')" -eq 0 ]
    if [ -n "$(ls -A "$T/repo/.scratch" 2>/dev/null)" ]; then ls -la "$T/repo/.scratch" >&2; return 1; fi
    if pgrep -f "qemu-(storage-daemon|nbd).*($T/repo|$T/tmp)" >/dev/null; then
        pgrep -af "qemu-(storage-daemon|nbd).*($T/repo|$T/tmp)" >&2
        return 1
    fi
    assert_no_private_dirs
    # the device is attached to its own node again, not to a filter
    [ "$(qmp query-block | jq -r '.[] | select(.qdev |
        startswith("/machine/peripheral/disk0/")) | .inserted."node-name"')" = disk0-fmt ]
    [ "$(qmp query-block | jq '[.[] | select(.inserted."node-name" // "" |
        startswith("qbk-"))] | length')" -eq 0 ]
}

# manifest_field NAME DISK FIELD
manifest_field() {
    jq -r --arg d "$2" --arg f "$3" '.disks[] | select(.disk == $d) | .[$f]' \
        "$T/pull-$1.json"
}
