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

struct admin_cli {
    const struct admin_cli_cmd *cmd;
    char **rest;                 /* the command, then the arguments kept for cfg_load */
    int nrest;
    bool json;                   /* --json */
    int status;                  /* -1 while parsing goes on; else the exit status (0 after
                                    --help, 2 after a usage error, both already printed) */
};

/* argv[*i]: one of the command's flags, --json, --help/-h (usage on stdout, status 0), or
 * kept for cfg_load. */
static void cli_arg(struct admin_cli *cli, int argc, char **argv, int *i)
{
    char *arg = argv[*i];
    for (const struct admin_cli_flag *f = cli->cmd->flags; f && f->name; f++) {
        bool bad = false;
        if (!f->value) {
            if (strcmp(arg, f->name) != 0) continue;
            *f->set = true;
            return;
        }
        if (!admin_take_flag(argc, argv, i, f->name, f->value, &bad)) continue;
        if (bad) cli->status = 2;
        return;
    }
    if (strcmp(arg, "--json") == 0) {
        cli->json = true;
    } else if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
        cli->cmd->usage(stdout);
        cli->status = 0;
    } else {
        cli->rest[cli->nrest++] = arg;
    }
}

/* Takes the arguments; a required flag missing is a usage error. */
static void cli_parse(struct admin_cli *cli, int argc, char **argv)
{
    for (int i = 0; i < argc && cli->status < 0; i++) cli_arg(cli, argc, argv, &i);
    for (const struct admin_cli_flag *f = cli->cmd->flags; f && f->name && cli->status < 0; f++)
        if (f->required && !*f->value) {
            cli->cmd->usage(stderr);
            cli->status = 2;
        }
}

void admin_cli_print_json(json_object *o)
{
    fprintf(stdout, "%s\n",
            json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY |
                                                  JSON_C_TO_STRING_NOSLASHESCAPE));
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
        fprintf(stderr, "ticketd %s: unexpected argument %s\n", cli->cmd->command,
                cli->rest[argi]);
        cli->cmd->usage(stderr);
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
                cli->cmd->command, http_example);
        return 2;
    }
    return -1;
}

int admin_cli_main(const struct admin_cli_cmd *cmd, const void *opts, int argc, char **argv)
{
    struct admin_cli cli = {.cmd = cmd, .status = -1};
    if (!(cli.rest = calloc((size_t)argc + 2, sizeof *cli.rest))) return 2;
    cli.rest[cli.nrest++] = (char *)cmd->command;
    cli_parse(&cli, argc, argv);
    struct cfg cfg;
    bool loaded = false;
    int status = cli.status >= 0 ? cli.status : cli_load(&cli, &cfg, &loaded, cmd->http_example);
    if (status < 0) {
        json_object *report = NULL;
        char err[512] = "";
        int r = cmd->run(&cfg, opts, cli.json ? NULL : stdout, cli.json ? &report : NULL, err,
                         sizeof err);
        if (r < 0) {
            fprintf(stderr, "ticketd %s: error: %s\n", cmd->command, err);
            status = 2;
        } else {
            if (cli.json) {
                admin_cli_print_json(report);
                json_object_put(report);
            }
            fflush(stdout);
            status = r > 0 ? cmd->if_found : cmd->if_none;
        }
    }
    if (loaded) cfg_free(&cfg);
    free(cli.rest);
    return status;
}
