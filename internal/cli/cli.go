// Package cli is the tiny subcommand framework shared by cmd/dupsnap and
// cmd/dupproxy: each subcommand lives in its own file and registers itself,
// so adding one never touches another's code.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"

	"github.com/sirupsen/logrus"
)

// Command is one subcommand ("dupsnap serve").
type Command struct {
	Name  string
	Usage string // one line: "serve [flags]"
	Short string // one sentence for the command list
	Long  string // paragraphs shown by "<cmd> --help"
	// Flags adds the command's flags to fs; Run gets the parsed set's args.
	Flags func(fs *flag.FlagSet)
	Run   func(ctx context.Context, args []string) error
}

// ErrUsage makes Main print the command's help and exit 2.
var ErrUsage = errors.New("usage error")

// App is a program made of subcommands.
type App struct {
	Name     string
	Short    string
	commands map[string]*Command
}

// Register adds a command; call it from init().
func (a *App) Register(c *Command) {
	if a.commands == nil {
		a.commands = map[string]*Command{}
	}
	a.commands[c.Name] = c
}

func (a *App) usage(w io.Writer) {
	fmt.Fprintf(w, "%s - %s\n\nUsage: %s <command> [flags] [args]\n\nCommands:\n", a.Name, a.Short, a.Name)
	names := make([]string, 0, len(a.commands))
	for n := range a.commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-14s %s\n", n, a.commands[n].Short)
	}
	fmt.Fprintf(w, "\nRun '%s <command> --help' for the flags of a command.\n", a.Name)
}

// Main runs the program and exits.
func (a *App) Main() {
	os.Exit(a.Run(os.Args[1:]))
}

// Run dispatches args and returns the exit code.
func (a *App) Run(args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		if len(args) > 1 {
			if c, ok := a.commands[args[1]]; ok {
				a.commandUsage(os.Stdout, c, nil)
				return 0
			}
		}
		a.usage(os.Stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	c, ok := a.commands[args[0]]
	if !ok {
		fmt.Fprintf(os.Stderr, "%s: unknown command %q\n\n", a.Name, args[0])
		a.usage(os.Stderr)
		return 2
	}
	fs := flag.NewFlagSet(a.Name+" "+c.Name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	if c.Flags != nil {
		c.Flags(fs)
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			a.commandUsage(os.Stdout, c, fs)
			return 0
		}
		fmt.Fprintf(os.Stderr, "%s %s: %v\n\n", a.Name, c.Name, err)
		a.commandUsage(os.Stderr, c, fs)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := c.Run(ctx, fs.Args()); err != nil {
		if errors.Is(err, ErrUsage) {
			fmt.Fprintf(os.Stderr, "%s %s: %v\n\n", a.Name, c.Name, err)
			a.commandUsage(os.Stderr, c, fs)
			return 2
		}
		logrus.WithField("command", c.Name).Error(err)
		return 1
	}
	return 0
}

func (a *App) commandUsage(w io.Writer, c *Command, fs *flag.FlagSet) {
	fmt.Fprintf(w, "Usage: %s %s\n\n%s\n", a.Name, c.Usage, c.Short)
	if c.Long != "" {
		fmt.Fprintf(w, "\n%s\n", strings.TrimSpace(c.Long))
	}
	if fs == nil {
		fs = flag.NewFlagSet(c.Name, flag.ContinueOnError)
		if c.Flags != nil {
			c.Flags(fs)
		}
	}
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	if n > 0 {
		fmt.Fprintf(w, "\nFlags:\n")
		fs.SetOutput(w)
		fs.PrintDefaults()
	}
}

// Usagef returns an error that makes Main print the command's help.
func Usagef(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrUsage, fmt.Sprintf(format, args...))
}

// SetupLogging applies a --log-level value.
func SetupLogging(level string) error {
	l, err := logrus.ParseLevel(level)
	if err != nil {
		return Usagef("bad --log-level %q (use trace, debug, info, warn, error)", level)
	}
	logrus.SetLevel(l)
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	return nil
}
