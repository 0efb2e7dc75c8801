#!/usr/bin/env bats
# What contrib/ ships for running qbk-pull on a schedule: a systemd
# template unit and timer, and a Kubernetes CronJob. Checked by the tools
# that read them (systemd-analyze verify, a YAML parser), and every qbk
# option they use is one qbk-pull knows (no drift from --help).

bats_require_minimum_version 1.5.0
load helpers

setup() {
    common_setup
    C=$BATS_TEST_DIRNAME/../contrib
}

teardown() {
    common_teardown
}

# options_known OPTION...: each --option is in qbk-pull --help.
options_known() {
    local help o
    help=$(qbk-pull --help)
    for o in "$@"; do
        o=${o%%=*}
        [[ "$o" == --* ]] || continue
        if ! grep -qE -- "[ ,]$o[ =]" <<<"$help"; then
            echo "qbk-pull has no option $o" >&2
            return 1
        fi
    done
}

@test "systemd: qbk-pull@.service and its timer verify cleanly, and use only options qbk-pull has" {
    mkdir "$T/units"
    cp "$C"/systemd/qbk-pull@.service "$C"/systemd/qbk-pull@.timer "$T/units/"
    # verify checks that ExecStart's program exists: point it at ours
    sed -i "s|/usr/local/bin/qbk-pull|$QBK_BIN/qbk-pull|" "$T/units/qbk-pull@.service"
    run systemd-analyze verify "$T/units/qbk-pull@vm1.service" "$T/units/qbk-pull@vm1.timer"
    echo "$output"
    [ "$status" -eq 0 ]
    [ -z "$output" ]
    # a broken unit would have been noticed
    sed 's/^Nice=/Nicee=/' "$T/units/qbk-pull@.service" >"$T/units/broken@.service"
    run systemd-analyze verify "$T/units/broken@vm1.service"
    [[ "$output" == *"Unknown key"* ]]
    # ExecStart's options, and those of the example environment file
    exec_line=$(grep '^ExecStart=' "$C/systemd/qbk-pull@.service")
    # shellcheck disable=SC2086
    options_known ${exec_line#ExecStart=}
    example=$(sed -n 's/^#   QBK_PULL_ARGS=//p' "$C/systemd/qbk-pull@.service")
    # shellcheck disable=SC2086
    options_known $example
    grep -q '^Persistent=true' "$C/systemd/qbk-pull@.timer"
}

@test "kubernetes: the CronJob is valid YAML of the right shape, and uses only options qbk-pull has" {
    run -0 python3 - "$C/kubernetes/qbk-pull-cronjob.yaml" <<'PY'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "CronJob", doc["kind"]
spec = doc["spec"]
assert spec["concurrencyPolicy"] == "Forbid"
pod = spec["jobTemplate"]["spec"]["template"]["spec"]
assert pod["restartPolicy"] == "Never"
c = pod["containers"][0]
assert c["command"] == ["/usr/local/bin/qbk-pull"], c["command"]
mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
vols = {v["name"] for v in pod["volumes"]}
assert set(mounts) <= vols, (mounts, vols)
print(" ".join(c["args"]))
PY
    args=$output
    [[ "$args" == *--tls-creds=/etc/qbk/pki* ]]
    # shellcheck disable=SC2086
    options_known $args
}
