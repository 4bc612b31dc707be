/* admin_cli: see admin_cli.h. */
#include "admin_cli.h"

#include <stdlib.h>
#include <string.h>

#include "log.h"

bool admin_take_flag(int argc, char **argv, int *i, const char *name, const char **value,
                     bool *bad)
{
    size_t n = strlen(name);
    const char *arg = argv[*i];
    if (strncmp(arg, name, n) != 0) return false;
    if (arg[n] == '=') {
        *value = arg + n + 1;
        return true;
    }
    if (arg[n] != '\0') return false;
    if (*i + 1 >= argc) {
        fprintf(stderr, "ticketd: %s needs a value\n", name);
        *bad = true;
        return true;
    }
    *value = argv[++*i];
    return true;
}

int admin_cli_init(struct admin_cli *cli, const char *command, void (*usage)(FILE *out),
                   int argc)
{
    memset(cli, 0, sizeof *cli);
    cli->command = command;
    cli->usage = usage;
    cli->status = -1;
    cli->rest = calloc((size_t)argc + 2, sizeof *cli->rest);
    if (!cli->rest) return -1;
    cli->rest[cli->nrest++] = (char *)command;
    return 0;
}

bool admin_cli_flag(struct admin_cli *cli, int argc, char **argv, int *i, const char *name,
                    const char **value)
{
    bool bad = false;
    if (!admin_take_flag(argc, argv, i, name, value, &bad)) return false;
    if (bad) cli->status = 2;
    return true;
}

void admin_cli_other(struct admin_cli *cli, char *arg)
{
    if (strcmp(arg, "--json") == 0) {
        cli->json = true;
    } else if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
        cli->usage(stdout);
        cli->status = 0;
    } else {
        cli->rest[cli->nrest++] = arg;
    }
}

/* Loads cfg from the environment and the kept flags: -1 when the command can run, else the
 * exit status (the error printed). */
static int cli_load(struct admin_cli *cli, struct cfg *cfg, bool *loaded,
                    const char *http_example)
{
    int argi = 1;
    int r = cfg_load(cfg, cli->nrest, cli->rest, &argi);
    if (r != 0) return r > 0 ? 0 : 2;
    *loaded = true;
    if (argi < cli->nrest) {
        fprintf(stderr, "ticketd %s: unexpected argument %s\n", cli->command, cli->rest[argi]);
        cli->usage(stderr);
        return 2;
    }
    log_set_level(cfg->log_level);
    if (!cfg->kafka_brokers || !*cfg->kafka_brokers) {
        fprintf(stderr,
                "ticketd %s: KAFKA_BROKERS is empty. The embedded mock cluster lives inside the\n"
                "serving process, so this command cannot reach it: run the mock standalone with\n"
                "`ticketd kafka-mock` and point both `ticketd serve` and this command at its\n"
                "bootstrap address (KAFKA_BROKERS=...), or ask the running service:\n"
                "  curl -H \"Authorization: Bearer $ADMIN_TOKEN\" %s\n",
                cli->command, http_example);
        return 2;
    }
    return -1;
}

int admin_cli_run(struct admin_cli *cli, const char *http_example, admin_cli_run_fn run,
                  const void *opts, int if_found, int if_none)
{
    struct cfg cfg;
    bool loaded = false;
    int status = cli->status >= 0 ? cli->status : cli_load(cli, &cfg, &loaded, http_example);
    if (status < 0) {
        json_object *report = NULL;
        char err[512] = "";
        int r = run(&cfg, opts, cli->json ? NULL : stdout, cli->json ? &report : NULL, err,
                    sizeof err);
        if (r < 0) {
            fprintf(stderr, "ticketd %s: error: %s\n", cli->command, err);
            status = 2;
        } else {
            if (cli->json) {
                fprintf(stdout, "%s\n",
                        json_object_to_json_string_ext(report, JSON_C_TO_STRING_PRETTY |
                                                                   JSON_C_TO_STRING_NOSLASHESCAPE));
                json_object_put(report);
            }
            fflush(stdout);
            status = r > 0 ? if_found : if_none;
        }
    }
    if (loaded) cfg_free(&cfg);
    free(cli->rest);
    cli->rest = NULL;
    return status;
}
