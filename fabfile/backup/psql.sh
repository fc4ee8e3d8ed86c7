#!/bin/sh
# Inside the postgres container: run the SQL read from stdin in DATABASE with
# psql, stopping at the first error. Values go in as psql variables (-v
# name=value, used as :"name" for an identifier, :'name' for a literal: psql
# quotes them itself); :"owner" is the stack's superuser.
#   psql.sh DATABASE [-v name=value]...
export PGUSER="$POSTGRES_USER" PGPASSWORD="$POSTGRES_PASSWORD" PGDATABASE="$POSTGRES_DB"
db="$1"; shift
exec psql -X -q -v ON_ERROR_STOP=1 -tA -v owner="$POSTGRES_USER" -d "$db" "$@"
