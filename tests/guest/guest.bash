# Helpers for the real-guest tier: a Linux guest (tests/guest/build) with
# two ext4 disks and qemu-guest-agent, driven through a shell on a
# virtio-serial port. Loaded after helpers.bash.

# where the guest is built and cached (beside the binaries under test)
QBK_GUEST_DIR=${QBK_GUEST_DIR:-$(cd "$QBK_BIN/.." && pwd)/guest}

guest_build() {
    "$BATS_TEST_DIRNAME/guest/build" "$QBK_GUEST_DIR"
}

# make_fs_images [SIZE]: disk0.qcow2 and disk1.qcow2 in $T, each an ext4
# file system (made here: the guest has no mkfs).
make_fs_images() {
    local d
    for d in disk0 disk1; do
        truncate -s "${1:-128M}" "$T/$d.raw"
        mkfs.ext4 -q -F -L "$d" "$T/$d.raw"
        qemu-img convert -O qcow2 "$T/$d.raw" "$T/$d.qcow2"
        rm -f "$T/$d.raw"
    done
}

# launch_guest [EXTRA QEMU ARGS...]: boot the guest on the images of
# make_fs_images (discards reach them, as fstrim needs), with the sockets of run_vm (qmp.sock for qbk, test.sock
# for the test), the agent's channel ga.sock and the test's shell.sock.
# Waits until the guest says it is up.
launch_guest() {
    local i
    rm -f "$T"/{qmp,test,ga,shell}.sock "$T/console.log"
    qemu-system-x86_64 -M q35 -m 256 -display none -nodefaults -no-user-config \
        -kernel "$QBK_GUEST_DIR/vmlinuz" -initrd "$QBK_GUEST_DIR/initrd.img" \
        -append "console=ttyS0 panic=-1 quiet" $([ -n "${GUEST_REBOOTS:-}" ] || echo -no-reboot) \
        -serial "file:$T/console.log" \
        -qmp "unix:$T/qmp.sock,server=on,wait=off" \
        -qmp "unix:$T/test.sock,server=on,wait=off" \
        -device virtio-serial-pci,id=vser0 \
        -chardev "socket,id=ga0,path=$T/ga.sock,server=on,wait=off" \
        -device virtserialport,chardev=ga0,name=org.qemu.guest_agent.0 \
        -chardev "socket,id=sh0,path=$T/shell.sock,server=on,wait=off" \
        -device virtserialport,chardev=sh0,name=qbk.shell \
        -blockdev "driver=file,filename=$T/disk0.qcow2,node-name=disk0-file,discard=unmap" \
        -blockdev "driver=qcow2,file=disk0-file,node-name=disk0-fmt,discard=unmap" \
        -device virtio-blk-pci,drive=disk0-fmt,id=disk0 \
        -blockdev "driver=file,filename=$T/disk1.qcow2,node-name=disk1-file,discard=unmap" \
        -blockdev "driver=qcow2,file=disk1-file,node-name=disk1-fmt,discard=unmap" \
        -device virtio-blk-pci,drive=disk1-fmt,id=disk1 \
        -daemonize -pidfile "$T/qemu.pid" "$@"
    guest_wait_up 1
    guest_shell_start
}

# guest_wait_up N: until the guest said it is up N times (boots), 60 s.
guest_wait_up() {
    local i
    for i in $(seq 600); do
        [ "$(grep -c "guest: up" "$T/console.log" 2>/dev/null)" -ge "$1" ] && break
        sleep 0.1
    done
    if [ "$(grep -c "guest: up, file systems: vda vdb" "$T/console.log")" -lt "$1" ]; then
        echo "the guest did not come up:" >&2
        cat "$T/console.log" >&2
        return 1
    fi
}

# gsend COMMAND: send COMMAND to the guest's shell, not waiting for it
# (a poweroff or reboot never answers).
gsend() {
    printf '%s\n' "$*" >>"$T/guest.in"
}

# The test's shell in the guest: one connection for the whole test (a
# virtio-serial port serves one client), commands appended to guest.in.
guest_shell_start() {
    : >"$T/guest.in"
    : >"$T/guest.out"
    setsid bash -c 'tail -n +1 -f "$1" | socat - "UNIX-CONNECT:$2" >"$3"' \
        _ "$T/guest.in" "$T/shell.sock" "$T/guest.out" &
    echo $! >"$T/guest-shell.pid"
    echo 0 >"$T/guest.seq"
    gsh true
}

guest_shell_stop() {
    local pid
    pid=$(cat "$T/guest-shell.pid" 2>/dev/null) || return 0
    kill -TERM -- "-$pid" 2>/dev/null || true
    rm -f "$T/guest-shell.pid"
}

# gsh COMMAND...: run COMMAND in the guest (sh -c), print its output;
# its exit status is gsh's. Bounded by 60 s.
gsh() {
    local mark i rc seq
    # a file, not a variable: gsh runs in $(...) subshells too
    seq=$(($(cat "$T/guest.seq") + 1))
    echo "$seq" >"$T/guest.seq"
    mark="__qbk_done_${seq}_"
    printf '%s\necho "%s$?"\n' "$*" "$mark" >>"$T/guest.in"
    for i in $(seq 1200); do
        if grep -q "^$mark" "$T/guest.out"; then
            rc=$(grep "^$mark" "$T/guest.out" | sed "s/^$mark//")
            # what the command printed: after the previous mark
            awk -v m="$mark" -v p="__qbk_done_$((seq - 1))_" '
                index($0, p) == 1 { out = ""; next }
                index($0, m) == 1 { printf "%s", out; exit }
                { out = out $0 "\n" }' "$T/guest.out"
            return "$rc"
        fi
        sleep 0.05
    done
    echo "gsh: no answer from the guest to: $*" >&2
    return 124
}

# agent COMMAND: ask the guest agent directly (as an operator would).
agent() {
    qbk-qmp --agent "$T/ga.sock" "$@"
}

# restored_fs BACKUP DISK: restore DISK of BACKUP (an id) to a raw file,
# printed.
restored_fs() {
    qbk-restore --repo "$T/repo" --backup "$1" --disk "$2" \
        -o "$T/restored-$1-$2.raw" >/dev/null
    echo "$T/restored-$1-$2.raw"
}

# needs_recovery IMAGE: whether the ext4 journal of IMAGE must be replayed.
needs_recovery() {
    dumpe2fs -h "$1" 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery'
}

# journal_clean IMAGE: the opposite, as a command that can fail a test
# (bash's errexit ignores a command negated with !).
journal_clean() {
    dumpe2fs -h "$1" 2>/dev/null | grep -q '^Filesystem features:' &&
        ! needs_recovery "$1"
}
