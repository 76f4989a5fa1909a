#!/bin/sh
# As the official image does: protected mode off (only the stack's own network reaches the
# container), and flags alone mean flags for redis-server.
set -eu
case "${1:-}" in -*) set -- redis-server "$@" ;; esac
if [ "${1:-}" = redis-server ]; then
  shift
  set -- redis-server --protected-mode no "$@"
fi
exec "$@"
