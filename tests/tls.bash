# Helpers for the TLS tests: a throwaway PKI made with certtool for each
# test, in QEMU's tls-creds-x509 layout (which libnbd's tls-certificates
# shares). Loaded after helpers.bash.

# _cert NAME TEMPLATE CA-DIR: a key and a certificate NAME-{key,cert}.pem
# in $T/pki, signed by the CA in CA-DIR (ca-key.pem, ca-cert.pem).
_cert() {
    certtool --generate-privkey --key-type=ecdsa \
        --outfile "$T/pki/$1-key.pem" 2>/dev/null
    printf '%b' "$2" >"$T/pki/$1.info"
    certtool --generate-certificate --load-privkey "$T/pki/$1-key.pem" \
        --load-ca-certificate "$3/ca-cert.pem" --load-ca-privkey "$3/ca-key.pem" \
        --template "$T/pki/$1.info" --outfile "$T/pki/$1-cert.pem" 2>/dev/null
}

# _ca DIR CN: a self-signed CA in DIR.
_ca() {
    mkdir -p "$1"
    certtool --generate-privkey --key-type=ecdsa --outfile "$1/ca-key.pem" 2>/dev/null
    printf 'cn = %s\nca\ncert_signing_key\nexpiration_days = 2\n' "$2" >"$1/ca.info"
    certtool --generate-self-signed --load-privkey "$1/ca-key.pem" \
        --template "$1/ca.info" --outfile "$1/ca-cert.pem" 2>/dev/null
}

# make_pki: $T/pki/{ca,other-ca} and the credentials directories
#   server/   QEMU's (server-cert.pem names localhost, and $PKI_SERVER_IP
#             if set)
#   client/   the backup host's (O=qbk tests, CN=qbk-backup-host)
#   intruder/ a client of the same CA with another identity
#   wrong-ca/ a client that trusts another CA (the server is unknown to it)
#   stranger/ a client whose certificate another CA signed
#   expired/  a client whose certificate expired in 2020
make_pki() {
    local d
    mkdir -m 700 "$T/pki"
    _ca "$T/pki/ca" "qbk test CA"
    _ca "$T/pki/other-ca" "another CA"
    _cert server "cn = localhost\ndns_name = localhost\n${PKI_SERVER_IP:+ip_address = $PKI_SERVER_IP\n}"'tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n' "$T/pki/ca"
    _cert client 'organization = qbk tests\ncn = qbk-backup-host\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n' "$T/pki/ca"
    _cert intruder 'cn = someone-else\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n' "$T/pki/ca"
    _cert stranger 'cn = qbk-backup-host\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n' "$T/pki/other-ca"
    _cert expired 'cn = qbk-backup-host\ntls_www_client\nencryption_key\nsigning_key\nactivation_date = "2020-01-01 00:00:00"\nexpiration_date = "2020-02-01 00:00:00"\n' "$T/pki/ca"
    mkdir "$T/pki/server"
    cp "$T/pki/ca/ca-cert.pem" "$T/pki/server/"
    cp "$T/pki/server-cert.pem" "$T/pki/server-key.pem" "$T/pki/server/"
    for d in client intruder stranger expired; do
        mkdir "$T/pki/$d"
        cp "$T/pki/ca/ca-cert.pem" "$T/pki/$d/"
        cp "$T/pki/$d-cert.pem" "$T/pki/$d/client-cert.pem"
        cp "$T/pki/$d-key.pem" "$T/pki/$d/client-key.pem"
    done
    mkdir "$T/pki/wrong-ca"
    cp "$T/pki/other-ca/ca-cert.pem" "$T/pki/wrong-ca/"
    cp "$T/pki/client/client-cert.pem" "$T/pki/client/client-key.pem" "$T/pki/wrong-ca/"
}

# tls_monitor_args PORT: QEMU options for a QMP monitor on 127.0.0.1:PORT
# with TLS, client certificates required (verify-peer).
tls_monitor_args() {
    echo "-object tls-creds-x509,id=qbktls0,dir=$T/pki/server,endpoint=server,verify-peer=on" \
        "-chardev socket,id=tlsmon0,host=127.0.0.1,port=$1,server=on,wait=off,tls-creds=qbktls0" \
        "-mon chardev=tlsmon0,mode=control"
}
