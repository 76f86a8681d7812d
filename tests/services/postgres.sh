#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests and examples: one directory holds
# its data, socket, log and the reader's password. Run as root (the server
# runs as the `postgres` OS user, through runuser).
#
#   postgres.sh start DIR PORT              initdb (once) and start; role sluice_reader
#                                           (password in DIR/password), database transit
#   postgres.sh load-trips DIR PORT PARQUET public.trips from a Parquet file (types
#                                           matching its Arrow schema), all rows
#   postgres.sh load-table DIR PORT TABLE PARQUET   the same for any table name
#   postgres.sh psql DIR PORT [ARGS…]       psql as the superuser (database transit)
#   postgres.sh tls DIR CERT KEY            serve TLS with CERT and KEY (copied into the
#                                           cluster, the key owned by postgres, mode 0600) and
#                                           require it over TCP (hostssl lines only); a running
#                                           server reloads and uses them before this returns
#   postgres.sh stop DIR                    pg_ctl stop -m fast
#   postgres.sh kill DIR                    pg_ctl stop -m immediate (fault tests)
#
# The cluster listens on 127.0.0.1:PORT (scram-sha-256 over TCP) and on a
# unix socket in DIR (trust, for the superuser `postgres`); every statement
# is logged (log_statement = 'all') to DIR/postgres.log. $PYTHON (default
# python3) with pyarrow converts Parquet for load-*.
set -euo pipefail

usage() { sed -n '2,22p' "$0" >&2; exit 2; }
die() { printf 'postgres.sh: %s\n' "$*" >&2; exit 1; }

ensure_postgres() {
    if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
        apt-get update && apt-get install -y postgresql
    fi
    PGBIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
}

as_postgres() { runuser -u postgres -- "$@"; }

superuser_psql() { # DIR PORT ARGS…
    local dir=$1 port=$2
    shift 2
    PGDATABASE=${PGDATABASE:-transit} psql -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres "$@"
}

cmd_start() {
    [[ $# -eq 2 ]] || usage
    local dir port=$2
    ensure_postgres
    mkdir -p "$1"
    dir=$(cd "$1" && pwd)
    chown postgres: "$dir"
    chmod 0755 "$dir"
    as_postgres test -w "$dir" -a -x "$dir" ||
        die "the postgres OS user cannot write $dir: a parent directory is closed to it (use a directory under a world-readable one, e.g. mkdtemp + chmod 755)"
    if [[ ! -f $dir/data/PG_VERSION ]]; then
        rm -rf "$dir/data"
        as_postgres "$PGBIN/initdb" -D "$dir/data" -U postgres --encoding=UTF8 --locale=C \
            --auth-local=trust --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1 ||
            die "initdb failed: $(cat "$dir/initdb.log")"
        echo "include_if_exists = 'sluice-test.conf'" >>"$dir/data/postgresql.conf"
    fi
    # Rewritten on every start: the port may change between runs.
    cat >"$dir/data/sluice-test.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
password_encryption = 'scram-sha-256'
logging_collector = off
log_destination = 'stderr'
log_statement = 'all'
log_line_prefix = '%m [%p] %q%u@%d '
log_connections = on
log_disconnections = on
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
    chown postgres: "$dir/data/sluice-test.conf"
    if as_postgres "$PGBIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        die "a server is already running in $dir/data (stop it first)"
    fi
    as_postgres "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start >/dev/null ||
        die "pg_ctl start failed; log: $(tail -n 20 "$dir/postgres.log")"

    # The reader's password: made once, kept across restarts (mode 600).
    if [[ ! -s $dir/password ]]; then
        (umask 077 && printf '%s\n' "$(head -c 24 /dev/urandom | base64 | tr -d '+/=' | head -c 24)" >"$dir/password")
    fi
    chmod 600 "$dir/password"
    local password
    password=$(head -n 1 "$dir/password")
    [[ $password =~ ^[A-Za-z0-9]+$ ]] || die "$dir/password does not hold an alphanumeric password"

    # Roles and the database. The password is set with statement logging off,
    # so it never reaches the log.
    superuser_psql "$dir" "$port" -d postgres <<SQL
SET log_statement = 'none';
SELECT 'CREATE ROLE sluice_setup NOLOGIN'
    WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_setup') \gexec
SELECT 'CREATE ROLE sluice_reader LOGIN'
    WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_reader') \gexec
ALTER ROLE sluice_reader WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '$password';
SELECT 'CREATE DATABASE transit OWNER sluice_setup'
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'transit') \gexec
REVOKE ALL ON DATABASE transit FROM PUBLIC;
GRANT CONNECT ON DATABASE transit TO sluice_reader;
SQL
    superuser_psql "$dir" "$port" -d transit <<'SQL'
ALTER SCHEMA public OWNER TO sluice_setup;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO sluice_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO sluice_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE sluice_setup IN SCHEMA public GRANT SELECT ON TABLES TO sluice_reader;
-- Tables a test makes as the superuser (postgres.sh psql) are readable too.
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public GRANT SELECT ON TABLES TO sluice_reader;
SQL
}

# Arrow schema → CREATE TABLE, and the rows as CSV, from a Parquet file.
convert_parquet() { # PARQUET TABLE CSV_OUT → DDL on stdout
    "${PYTHON:-python3}" - "$@" <<'PY'
import sys
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

path, table_name, csv_out = sys.argv[1:4]
table = pq.read_table(path)

def pg_type(t: pa.DataType) -> str:
    if pa.types.is_boolean(t): return "boolean"
    if pa.types.is_int16(t): return "smallint"
    if pa.types.is_int32(t): return "integer"
    if pa.types.is_int64(t): return "bigint"
    if pa.types.is_float32(t): return "real"
    if pa.types.is_float64(t): return "double precision"
    if pa.types.is_decimal128(t): return f"numeric({t.precision},{t.scale})"
    if pa.types.is_string(t) or pa.types.is_large_string(t): return "text"
    if pa.types.is_date32(t): return "date"
    if pa.types.is_timestamp(t) and t.unit == "us":
        if t.tz is None: return "timestamp"
        if t.tz in ("UTC", "+00:00", "Etc/UTC"): return "timestamptz"
    raise SystemExit(f"column type {t} has no PostgreSQL type that Sluice maps back to it")

def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'

columns = []
for field in table.schema:
    null = "" if field.nullable else " NOT NULL"
    columns.append(f"    {quote(field.name)} {pg_type(field.type)}{null}")
qualified = ".".join(quote(p) for p in table_name.split("."))
print(f"DROP TABLE IF EXISTS {qualified};")
print(f"CREATE TABLE {qualified} (\n" + ",\n".join(columns) + "\n);")
# Timestamps with a zone are written as UTC instants ("…Z"); PostgreSQL
# reads them as such whatever its TimeZone.
pacsv.write_csv(table, csv_out, pacsv.WriteOptions(include_header=True, quoting_style="needed"))
print(f"-- rows: {table.num_rows}")
PY
}

cmd_load_table() {
    [[ $# -eq 4 ]] || usage
    local dir port=$2 table=$3 parquet=$4
    dir=$(cd "$1" && pwd)
    [[ -f $parquet ]] || die "no such file: $parquet"
    local csv=$dir/load-$$.csv ddl rows
    ddl=$(convert_parquet "$parquet" "$table" "$csv") || { rm -f "$csv"; die "cannot convert $parquet"; }
    rows=$(sed -n 's/^-- rows: //p' <<<"$ddl")
    superuser_psql "$dir" "$port" -d transit <<SQL
SET client_min_messages = warning;
SET ROLE sluice_setup;
BEGIN;
$ddl
\copy $table FROM '$csv' WITH (FORMAT csv, HEADER true)
COMMIT;
ANALYZE $table;
SQL
    rm -f "$csv"
    local loaded
    loaded=$(superuser_psql "$dir" "$port" -d transit -tA -c "SELECT count(*) FROM $table")
    [[ $loaded == "$rows" ]] || die "loaded $loaded rows into $table, the file has $rows"
    echo "$table: $loaded rows"
}

cmd_psql() {
    [[ $# -ge 2 ]] || usage
    local dir port=$2
    dir=$(cd "$1" && pwd)
    shift 2
    superuser_psql "$dir" "$port" "$@"
}

cmd_tls() {
    [[ $# -eq 3 ]] || usage
    local dir cert=$2 key=$3
    [[ -d $1 ]] || die "no such directory: $1"
    dir=$(cd "$1" && pwd)
    [[ -f $dir/data/PG_VERSION ]] || die "no cluster in $dir (start it first)"
    [[ -f $cert && -f $key ]] || die "no such certificate or key: $cert $key"
    ensure_postgres
    # Named after the given files, so that a reload can be seen to have
    # taken the new ones (SHOW ssl_cert_file).
    local crt_name key_name
    crt_name=tls-$(basename "$cert").crt
    key_name=tls-$(basename "$key").key
    install -o postgres -g postgres -m 0644 "$cert" "$dir/data/$crt_name"
    install -o postgres -g postgres -m 0600 "$key" "$dir/data/$key_name"
    cat >"$dir/data/sluice-tls.conf" <<CONF
ssl = on
ssl_cert_file = '$crt_name'
ssl_key_file = '$key_name'
ssl_min_protocol_version = 'TLSv1.2'
CONF
    chown postgres: "$dir/data/sluice-tls.conf"
    grep -qxF "include_if_exists = 'sluice-tls.conf'" "$dir/data/postgresql.conf" ||
        echo "include_if_exists = 'sluice-tls.conf'" >>"$dir/data/postgresql.conf"
    # TCP only with TLS: no `host` (or `hostnossl`) line accepts a plain
    # connection, so PostgreSQL refuses one (no pg_hba.conf entry).
    cat >"$dir/data/pg_hba.conf" <<HBA
# postgres.sh tls: the superuser over the unix socket, everyone else over TLS.
local   all     all                     trust
hostssl all     all     127.0.0.1/32    scram-sha-256
HBA
    chown postgres: "$dir/data/pg_hba.conf"
    if as_postgres "$PGBIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_postgres "$PGBIN/pg_ctl" -D "$dir/data" reload >/dev/null
        local port tries=0
        port=$(sed -n 's/^port = //p' "$dir/data/sluice-test.conf")
        until [[ $(superuser_psql "$dir" "$port" -d postgres -tA -c "SHOW ssl_cert_file") == "$crt_name" &&
                 $(superuser_psql "$dir" "$port" -d postgres -tA -c "SHOW ssl") == on ]]; do
            ((++tries < 100)) || die "the server did not take the TLS settings; log: $(tail -n 20 "$dir/postgres.log")"
            sleep 0.1
        done
        if grep -q 'could not load\|FATAL\|ssl.*error' <(tail -n 5 "$dir/postgres.log"); then
            die "the server did not load the certificate or key: $(tail -n 5 "$dir/postgres.log")"
        fi
    fi
}

cmd_stop() { # DIR MODE
    local dir
    [[ -d $1 ]] || return 0
    dir=$(cd "$1" && pwd)
    ensure_postgres
    [[ -f $dir/data/PG_VERSION ]] || return 0
    if as_postgres "$PGBIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_postgres "$PGBIN/pg_ctl" -D "$dir/data" -m "$2" -w -t 60 stop >/dev/null
    fi
}

[[ $# -ge 1 ]] || usage
command=$1
shift
case $command in
    start) cmd_start "$@" ;;
    load-trips) [[ $# -eq 3 ]] || usage; cmd_load_table "$1" "$2" public.trips "$3" ;;
    load-table) cmd_load_table "$@" ;;
    psql) cmd_psql "$@" ;;
    tls) cmd_tls "$@" ;;
    stop) [[ $# -eq 1 ]] || usage; cmd_stop "$1" fast ;;
    kill) [[ $# -eq 1 ]] || usage; cmd_stop "$1" immediate ;;
    *) usage ;;
esac
