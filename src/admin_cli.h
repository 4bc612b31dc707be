/* admin_cli (admin_cli_): the frame of the CLI commands `ticketd audit|trace|report` (the
 * command's own flags first, then the settings flags) and of `ticketd dlq`'s flags. */
#ifndef TICKETD_ADMIN_CLI_H
#define TICKETD_ADMIN_CLI_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stdio.h>

#include "config.h"

/* A tool run for the CLI (cfg->kafka_brokers is set): the report goes to human_out or
 * *json_out; returns how much it found (>= 0), -1 on error or -2 on bad options (err). */
typedef int (*admin_cli_run_fn)(const struct cfg *cfg, const void *opts, FILE *human_out,
                                json_object **json_out, char *err, size_t errlen);

/* One flag of a command: "--name value" / "--name=value" into *value, or, with value NULL,
 * a bare "--name" that sets *set. A required flag missing is a usage error. */
struct admin_cli_flag {
    const char *name;
    const char **value;
    bool *set;
    bool required;
};

/* An admin tool's command. */
struct admin_cli_cmd {
    const char *command;                /* "audit": messages say "ticketd audit: ..." */
    void (*usage)(FILE *out);
    const struct admin_cli_flag *flags; /* the command's own, up to one with name NULL */
    const char *http_example;           /* the admin URL that answers the same (hint) */
    admin_cli_run_fn run;
    int if_found, if_none;              /* exit status when run found something, or nothing */
};

/* `ticketd <command> [own flags] [--json] [--help] [settings flags]`: takes the command's
 * flags into their values (opts points at them), loads the settings (environment, then the
 * remaining flags), runs cmd->run(&cfg, opts, ...) and prints its report (human text on
 * stdout, or the JSON with --json) or its error. Returns the exit status: 0 after --help, 2
 * on any error (printed; without Kafka brokers the hint names cmd->http_example), else
 * cmd->if_found or cmd->if_none. */
int admin_cli_main(const struct admin_cli_cmd *cmd, const void *opts, int argc, char **argv);

/* Prints a tool's JSON answer on stdout, the one format of every admin command. */
void admin_cli_print_json(json_object *o);

/* "--name value" / "--name=value" at argv[*i]: true when it matched; a missing value prints
 * "ticketd: --name needs a value" and sets *bad. */
bool admin_take_flag(int argc, char **argv, int *i, const char *name, const char **value,
                     bool *bad);

#endif
