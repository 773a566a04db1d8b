# Sourced by .ci/run: install Chromium best-effort from Debian's packages for the HTML
# report's two headless-browser tests (tests/test_report.py), which look for it at
# ${LYMPHDX_CHROMIUM:-/usr/bin/chromium}. With CI set they fail, not skip, when it is
# missing; so that the failure says why, apt's output is kept in the file named by
# LYMPHDX_CHROMIUM_APT_LOG (the tests quote its tail) and its tail is printed here.
chromium="${LYMPHDX_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
    LYMPHDX_CHROMIUM_APT_LOG=$(mktemp -t lymphdx-chromium-apt.XXXXXX)
    export LYMPHDX_CHROMIUM_APT_LOG
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "E: no apt-get on this machine to install chromium with" >"$LYMPHDX_CHROMIUM_APT_LOG"
    else
        { apt-get update -qq && apt-get install -y -qq chromium; } \
            >"$LYMPHDX_CHROMIUM_APT_LOG" 2>&1 || true
    fi
    if [ ! -x "$chromium" ]; then
        if [ -n "${CI:-}" ]; then
            then_what="fail (CI is set)"
        else
            then_what="be skipped (CI is not set)"
        fi
        echo "chromium not installed at $chromium (user $(id -un)); the browser tests will $then_what." >&2
        echo "apt-get said:" >&2
        tail -n 5 "$LYMPHDX_CHROMIUM_APT_LOG" >&2
    fi
fi
