# Helpers for qbk's bats tests: every test gets its own temp dir and its own
# QEMU, and teardown kills whatever it started, even when the test failed.
#
# QBK_BIN: directory holding the qbk binaries (default: build-test/cmd).

QBK_BIN=${QBK_BIN:-$(cd "$BATS_TEST_DIRNAME/.." && pwd)/build-test/cmd}
export PATH="$QBK_BIN:$PATH"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

DISK_SIZE=${DISK_SIZE:-64M}

common_setup() {
    T=$(mktemp -d "${BATS_TMPDIR:-/tmp}/qbk-test.XXXXXX")
    export QBK_QMP="$T/qmp.sock"
}

# Stop every process whose pid file is in $T, then remove $T.
common_teardown() {
    local pidfile pid i
    [ -n "${T:-}" ] && [ -d "$T" ] || return 0
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
    pkill -KILL -f "qemu-storage-daemon.*$T" 2>/dev/null || true
    rm -rf "$T"
}

# make_images: two qcow2 disks, one raw disk, in $T.
make_images() {
    qemu-img create -q -f qcow2 "$T/disk0.qcow2" "$DISK_SIZE"
    qemu-img create -q -f qcow2 "$T/disk1.qcow2" "$DISK_SIZE"
    qemu-img create -q -f raw "$T/disk2.raw" 16M
}

# launch_vm [EXTRA QEMU ARGS...]: start QEMU paused, no guest OS, on the
# images of make_images. disk0 is a -blockdev with named nodes, disk1 a
# -drive (auto-named node), disk2 raw, plus an empty CD-ROM drive.
launch_vm() {
    rm -f "$T/qmp.sock"
    qemu-system-x86_64 -M q35 -S -display none -nodefaults -no-user-config \
        -qmp "unix:$T/qmp.sock,server=on,wait=off" \
        -blockdev "driver=file,filename=$T/disk0.qcow2,node-name=disk0-file" \
        -blockdev "driver=qcow2,file=disk0-file,node-name=disk0-fmt" \
        -device virtio-blk-pci,drive=disk0-fmt,id=disk0 \
        -drive "file=$T/disk1.qcow2,format=qcow2,if=none,id=drive1" \
        -device virtio-blk-pci,drive=drive1,id=disk1 \
        -drive "file=$T/disk2.raw,format=raw,if=none,id=drive2" \
        -device virtio-blk-pci,drive=drive2,id=disk2 \
        -drive if=none,id=cd0,media=cdrom -device ide-cd,drive=cd0,bus=ide.0 \
        -pidfile "$T/qemu.pid" -daemonize "$@"
}

start_vm() {
    make_images
    launch_vm "$@"
}

# stop_vm: shut QEMU down cleanly (bitmaps are written to the images).
stop_vm() {
    local pid
    pid=$(cat "$T/qemu.pid")
    qbk-qmp quit >/dev/null 2>&1 || true
    wait_gone "$pid"
}

# kill_vm: kill -9, as a crash would.
kill_vm() {
    local pid
    pid=$(cat "$T/qemu.pid")
    kill -KILL "$pid"
    wait_gone "$pid"
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
    qbk-qmp "$@"
}

# guest_write DISK OFFSET LENGTH [PATTERN]: a write through the device, as
# the guest would do it (HMP qemu-io on the qdev).
guest_write() {
    local out
    out=$(qbk-qmp --hmp \
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
