/*
 * error.c -- one error domain for the C core. Every function that can fail
 * returns a vela_err and leaves a message for this thread; module.c turns the
 * pair into a Python exception in one place.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "vela.h"

static const char *const names[VELA_ERR_COUNT] = {
    [VELA_OK] = "VELA_OK",
    [VELA_ENOTFOUND] = "VELA_ENOTFOUND",
    [VELA_EFULL] = "VELA_EFULL",
    [VELA_ETOOLARGE] = "VELA_ETOOLARGE",
    [VELA_ELAYOUT] = "VELA_ELAYOUT",
    [VELA_ESYS] = "VELA_ESYS",
    [VELA_EPOISONED] = "VELA_EPOISONED",
    [VELA_ETIMEOUT] = "VELA_ETIMEOUT",
    [VELA_ECORRUPT] = "VELA_ECORRUPT",
    [VELA_EINVAL] = "VELA_EINVAL",
    [VELA_ENOTINT] = "VELA_ENOTINT",
    [VELA_EOVERFLOW] = "VELA_EOVERFLOW",
    [VELA_EFORMAT] = "VELA_EFORMAT",
    [VELA_ECALLER] = "VELA_ECALLER",
};

static __thread char message[512];

const char *vela_err_name(vela_err err)
{
    return (err >= 0 && err < VELA_ERR_COUNT) ? names[err] : "VELA_EUNKNOWN";
}

vela_err vela_fail(vela_err err, const char *fmt, ...)
{
    int n = snprintf(message, sizeof message, "%s: ", vela_err_name(err));
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof message)
        vsnprintf(message + n, sizeof message - (size_t)n, fmt, ap);
    va_end(ap);
    return err;
}

vela_err vela_fail_sys(const char *call, const char *what)
{
    int saved = errno;
    return vela_fail(VELA_ESYS, "%s failed (%s): %s", call, what, strerror(saved));
}

const char *vela_last_message(void)
{
    return message;
}
