#!/usr/bin/env bash
# Create config/ for docker compose (run once before `docker compose up --build -d`; running it again keeps
# every key and certificate that exists, and re-renders the NATS configs from shared/permissions.py):
#   config/ssh/    the SSH fallback worker's key pair (the demo host trusts its public key)
#   config/tls/    a private CA (ca.pem, ca.key), the NATS nodes' certificate (nats-1..3: client TLS and
#                  mutually verified cluster routes) and nginx's (lb: agents' wss://, HTTPS on :8443)
#   config/postgres/ a random PostgreSQL password (secret file) and api.env (WARLOCK_DATABASE_URL with it)
#   config/signing/ the API's command-signing key (signing.key, 0600, readable by the api containers only)
#                  and worker.env naming its public key for the SSH worker (WARLOCK_SSH_TRUSTED_KEYS)
#   config/nats/   one nkey seed per NATS role (nkeys/<role>.nk, 0600) and each node's nats-server config,
#                  rendered by `warlock nats-config` in the Warlock image: no anonymous NATS client
# WARLOCK_PUBLIC_NAMES (e.g. "DNS:panel.example,IP:203.0.113.5") adds names agents reach nginx by to its
# certificate.
set -euo pipefail
cd "$(dirname "$0")"
umask 077
mkdir -p config/ssh config/tls config/nats config/signing config/postgres
chmod 700 config config/ssh config/tls config/nats config/signing config/postgres

if [ ! -f config/ssh/id_ed25519 ]; then
  ssh-keygen -q -t ed25519 -N '' -C warlock-fallback-ssh -f config/ssh/id_ed25519
fi
chmod 600 config/ssh/id_ed25519 && chmod 644 config/ssh/id_ed25519.pub
echo "wrote config/ssh/id_ed25519(.pub)"

# PostgreSQL: a random password (hex: safe in a URL), given to postgres as a secret file and to the API as
# WARLOCK_DATABASE_URL in an env file; neither is in docker-compose.yml
if [ ! -f config/postgres/password ]; then
  openssl rand -hex 24 > config/postgres/password
fi
printf 'WARLOCK_DATABASE_URL=postgresql+asyncpg://warlock:%s@postgres/warlock\n' "$(cat config/postgres/password)" \
  > config/postgres/api.env
chmod 644 config/postgres/password config/postgres/api.env  # read by the postgres and api containers' users
echo "wrote config/postgres/password and api.env"

tls=config/tls
if [ ! -f "$tls/ca.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -sha256 \
    -subj "/CN=Warlock compose CA" -keyout "$tls/ca.key" -out "$tls/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
fi
issue() {  # issue NAME SUBJECT_ALT_NAMES: a key and a certificate signed by the CA (kept if present)
  local name=$1 sans=$2
  [ -f "$tls/$name.pem" ] && return 0
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
    -keyout "$tls/$name.key" -out "$tls/$name.csr" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n%s\nsubjectAltName=%s\n' \
    "extendedKeyUsage=serverAuth,clientAuth" "$sans" > "$tls/$name.ext"
  openssl x509 -req -in "$tls/$name.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 825 -sha256 -extfile "$tls/$name.ext" -out "$tls/$name.pem" 2>/dev/null
  rm -f "$tls/$name.csr" "$tls/$name.ext"
}
issue nats "DNS:nats-1,DNS:nats-2,DNS:nats-3,DNS:localhost,IP:127.0.0.1"
issue lb "DNS:lb,DNS:localhost,IP:127.0.0.1${WARLOCK_PUBLIC_NAMES:+,$WARLOCK_PUBLIC_NAMES}"
chmod 600 "$tls"/*.key && chmod 644 "$tls"/*.pem
echo "wrote $tls/ca.pem, nats.pem, lb.pem (keys 0600)"

# NATS: nkeys and configs, made by the Warlock image's own `warlock nats-config` (the nats-config service,
# profile init, in docker-compose.yml).
HOST_OWNER="$(id -u):$(id -g)" docker compose --profile init run --rm --build nats-config
echo "wrote config/nats/nats-{1,2,3}.conf, config/nats/nkeys/<role>.nk and config/signing/"
echo "NATS CLI here (read-only operator identity):"
echo "  nats --server tls://localhost:4222 --tlsca $PWD/$tls/ca.pem --nkey $PWD/config/nats/nkeys/operator.nk sub 'warlock.presence.>'"
