#!/usr/bin/env bash
# Make sure PostgreSQL, MariaDB and Redis answer on 127.0.0.1 as the tests expect:
# installed (apt) when missing, started when stopped, trust/no-password logins for tests.
set -euo pipefail

log() { printf 'services: %s\n' "$*" >&2; }
wait_for() {  # wait_for NAME CMD...: up to 30 s for CMD to succeed
  local name=$1; shift
  for _ in $(seq 1 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "$name did not come up"; return 1
}
apt_install() {
  [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- Redis
if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  command -v redis-server >/dev/null || { log "installing redis"; apt_install redis-server; }
  mkdir -p /var/lib/redis /var/log/redis
  log "starting redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for redis redis-cli -h 127.0.0.1 ping
fi

# --- PostgreSQL
if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
  command -v pg_ctlcluster >/dev/null || { log "installing postgresql"; apt_install postgresql; }
  log "starting postgresql"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
  wait_for postgresql pg_isready -h 127.0.0.1 -p 5432
fi
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  log "allowing trust logins from 127.0.0.1 for the tests"
  hba=$(su postgres -c "psql -Atc 'show hba_file'")
  sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  su postgres -c "psql -c 'select pg_reload_conf()'" >/dev/null
fi

# --- MariaDB
if ! mysqladmin -h 127.0.0.1 -uroot status >/dev/null 2>&1; then
  command -v mariadbd >/dev/null || { log "installing mariadb"; apt_install mariadb-server; }
  if ! mysqladmin --protocol=socket -uroot status >/dev/null 2>&1; then
    log "starting mariadb"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_for mariadb mysqladmin --protocol=socket -uroot status
  fi
  if ! mysqladmin -h 127.0.0.1 -uroot status >/dev/null 2>&1; then
    log "allowing root without a password over TCP for the tests"
    mariadb --protocol=socket -uroot -e \
      "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket; FLUSH PRIVILEGES;"
  fi
  wait_for mariadb-tcp mysqladmin -h 127.0.0.1 -uroot status
fi
log "postgresql, mariadb and redis are up"
