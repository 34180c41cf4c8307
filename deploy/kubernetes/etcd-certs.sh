#!/usr/bin/env bash
# Certificates for the etcd StatefulSet (base/etcd.yaml) and the control plane's link to it.
#   deploy/kubernetes/etcd-certs.sh DIR [NAMESPACE]      (default namespace: meshserve)
# Writes into DIR: ca.crt/ca.key (the etcd CA: keep ca.key offline, out of DIR once done),
# server.crt/.key and peer.crt/.key (every member; SANs *.etcd.NS.svc[.cluster.local],
# etcd.NS.svc, localhost, 127.0.0.1), meshserve.crt/.key (the control plane's client
# certificate, CN meshserve = its etcd user) and root.crt/.key (CN root, for etcdctl by an
# operator; never put it in a Secret). Keys are mode 0600. Nothing is overwritten.
# Needs openssl 1.1.1 or newer.
set -euo pipefail
dir=${1:?usage: $0 DIR [NAMESPACE]}
ns=${2:-meshserve}
mkdir -p "$dir"
cd "$dir"
umask 077
for f in ca.crt server.crt peer.crt meshserve.crt root.crt; do
  [ ! -e "$f" ] || { echo "$dir/$f exists: not overwriting" >&2; exit 1; }
done
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca.key
openssl req -x509 -new -key ca.key -days 3650 -subj "/CN=meshserve-etcd-ca" -out ca.crt
sans="DNS:*.etcd.$ns.svc,DNS:*.etcd.$ns.svc.cluster.local,DNS:etcd.$ns.svc,DNS:localhost,IP:127.0.0.1"
issue() {  # issue FILE COMMON_NAME EXTENSIONS
  key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
    -extfile <(printf '%b' "$3") -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
}
issue server etcd "subjectAltName=$sans\nextendedKeyUsage=serverAuth,clientAuth"
issue peer etcd-peer "subjectAltName=$sans\nextendedKeyUsage=serverAuth,clientAuth"
issue meshserve meshserve "extendedKeyUsage=clientAuth"
issue root root "extendedKeyUsage=clientAuth"
rm -f ca.srl
chmod 0644 ./*.crt
echo "etcd certificates in $dir (namespace $ns); move ca.key and root.key somewhere offline"
