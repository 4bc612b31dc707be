/* check.h: the unit tests' one assertion macro (every test/unit/test_*.c uses it). Each check prints a line; main() ends with
 * CHECK_SUMMARY(), which prints "N passed, N failed" and returns the exit status. */
#ifndef TICKETD_TEST_CHECK_H
#define TICKETD_TEST_CHECK_H

#include <stdio.h>

static int passed, failed;

#define CHECK(cond, ...)                                                                       \
    do {                                                                                       \
        if (cond) {                                                                            \
            passed++;                                                                          \
            printf("ok   ");                                                                   \
        } else {                                                                               \
            failed++;                                                                          \
            printf("FAIL %s:%d ", __FILE__, __LINE__);                                         \
        }                                                                                      \
        printf(__VA_ARGS__);                                                                   \
        printf("\n");                                                                          \
        fflush(stdout); /* tests with threads or child processes interleave their output */    \
    } while (0)

#define CHECK_SUMMARY()                                                                        \
    (printf("%d passed, %d failed\n", passed, failed), failed ? 1 : 0)

#endif
