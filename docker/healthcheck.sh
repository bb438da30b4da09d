#!/bin/sh
# HEALTHCHECK of the image: exit 0 while a Ray node in this container answers, 1 otherwise.
#
# `ray health-check` alone gets the two documented uses of the image wrong in Ray 2.60:
# - one-shot `run_encode.py`: ray.init() turns token auth on for its local cluster (RAY_AUTH_MODE
#   unset -> token) and writes the token to ~/.ray/auth_token, but only in the driver's environment;
#   the CLI in the health check still sees RAY_AUTH_MODE unset = disabled, sends no token and fails
#   with InvalidAuthToken.
# - `ray start --head` without any token: auth is off. Forcing RAY_AUTH_MODE=token in the check
#   would then fail for want of a token.
# So: when a token is at hand where Ray looks for one (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
# ~/.ray/auth_token), send it (RAY_AUTH_MODE=token); a node with auth off accepts a request that
# carries a token. Without a token, ask as the environment says. Should the first try fail, try the
# other way once (e.g. RAY_AUTH_MODE=token set for a node that was started without it).
# Ray down, or not started yet: `ray health-check` finds no GCS and exits 1 either way.
set -u

token=""  # where the token is, if anywhere (for whoever reads this with sh -x)
if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
    token="RAY_AUTH_TOKEN"
elif [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && [ -s "${RAY_AUTH_TOKEN_PATH}" ]; then
    token="RAY_AUTH_TOKEN_PATH"
elif [ -s "${HOME:-/nonexistent}/.ray/auth_token" ]; then
    token="HOME/.ray/auth_token"
fi

if [ -n "$token" ]; then
    RAY_AUTH_MODE=token ray health-check "$@" && exit 0
    ray health-check "$@" && exit 0
else
    ray health-check "$@" && exit 0
    if [ "${RAY_AUTH_MODE:-}" = token ]; then
        RAY_AUTH_MODE=disabled ray health-check "$@" && exit 0
    fi
fi
exit 1
