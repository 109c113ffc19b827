"""``i2x demo`` (the whole method on the default data, with a report) and ``i2x train`` (a small
model on a named dataset with online tracking: stages 1-2)."""

from __future__ import annotations

from pathlib import Path

from i2x.cli.common import (
    COMMON,
    DATA_HELP,
    DATA_NAMES,
    add_memory_budget,
    device_name,
    emit,
    int_list,
    positive_float,
    positive_int,
    warnings_as_lines,
)


def register(sub) -> None:
    demo = sub.add_parser(
        "demo", parents=[COMMON],
        help="the whole method on the default data: train, explain, curate, experiment, report",
        description="Train the small ResNet on the default data (Fashion-MNIST when found, else scikit-learn's digits) "
                    "with online tracking, find prototypes, analyse, find the targets of the most confused pair, run "
                    "a small fine-tuning experiment, and write the report. Resumable: run it again on the same folder "
                    "and every finished stage is reused.")
    demo.add_argument("folder", nargs="?", type=Path, default=None,
                      help="the run folder (default ./i2x-demo, or ./i2x-demo-quick with --quick)")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the small plan: under two minutes on 2 CPU cores")
    size.add_argument("--full", action="store_true", help="the full experiment: every arm, 5 seeds")
    demo.add_argument("--data", default=None, help=f"a dataset by name instead of the default ({DATA_NAMES})")
    demo.add_argument("--data-root", type=Path, default=None, help="dataset folder in torchvision's layout")
    demo.add_argument("--arms", default=None, help="comma-separated arms instead of the plan's")
    demo.add_argument("--seeds", type=positive_int, default=None, help="seeds instead of the plan's")
    demo.add_argument("--train-size", type=positive_int, default=None, help="training images (a stratified subset)")
    demo.add_argument("--epochs", type=positive_int, default=None, help="training epochs")
    demo.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    demo.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                      help="the training loop's precision (auto: bfloat16 autocast where the CPU has it)")
    demo.add_argument("--no-report", action="store_true", help="skip the HTML report")
    add_memory_budget(demo)
    demo.set_defaults(handler=_demo)

    train = sub.add_parser("train", parents=[COMMON],
                           help="train a small model on a named dataset with online tracking",
                           description="Stages 1-2: train i2x's small ResNet (or resnet50) with an online Tracker, fit "
                                       "the prototypes, keep the final weights in the run. Resumable.")
    train.add_argument("run", type=Path, help="the run folder (created, or resumed)")
    train.add_argument("--data", required=True, help=DATA_HELP)
    train.add_argument("--data-root", type=Path, default=None, help="dataset folder in torchvision's layout")
    train.add_argument("--size", type=positive_int, default=None, help="resize the images to SIZE px")
    train.add_argument("--model", default="small-resnet", help="small-resnet (default) or resnet50")
    train.add_argument("--widths", type=int_list, default=None, help="small-resnet stage widths, e.g. 16,32,64")
    train.add_argument("--epochs", type=positive_int, default=4, help="training epochs (default 4)")
    train.add_argument("--train-size", type=positive_int, default=None,
                       help="train on a stratified subset of this many images (recorded in the run)")
    train.add_argument("--probe-size", type=positive_int, default=2_000,
                       help="images tracked at every checkpoint, a stratified subset (default 2000)")
    train.add_argument("--n-prototypes", type=positive_int, default=16, help="prototypes to find (default 16)")
    train.add_argument("--lr", type=positive_float, default=None, help="learning rate (default 0.05, cosine decay)")
    train.add_argument("--batch-size", type=positive_int, default=128, help="training batch size (default 128)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order")
    train.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                       help="the training loop's precision (auto: bfloat16 autocast where the CPU has it)")
    train.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    add_memory_budget(train)
    train.set_defaults(handler=_train)


def _demo(args) -> int:
    from i2x.apps.demo import demo, summary_lines

    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip()) if args.arms else None
    with warnings_as_lines("demo"):
        summary = demo(args.folder, quick=args.quick, full=args.full, data=args.data, root=args.data_root,
                       arms=arms, seeds=args.seeds, train_size=args.train_size, epochs=args.epochs,
                       device=args.device, precision=args.precision, report=not args.no_report,
                       memory_budget=args.memory_budget)

    def text() -> str:
        where = [f"run     {summary['run']}"]
        if summary.get("report"):
            where.append(f"report  {summary['report']}")
        return "\n".join(where + [""] + summary_lines(summary))

    emit(args, summary, text)
    return 0


def _train(args) -> int:
    from i2x.apps.demo import train_run
    from i2x.data import load_dataset, training_subset
    from i2x.loop.training import calibration_images, evaluate

    full = load_dataset(args.data, root=args.data_root, train=True, size=args.size)
    if args.train_size is not None and args.train_size > len(full):
        raise ValueError(f"--train-size: {args.train_size} is more than the {len(full)} training images of "
                         f"{args.data}")
    train, record = training_subset(full, args.train_size, seed=0)
    if args.size is not None:
        record["size"] = args.size
    store, model, layer = train_run(args.run, train, model=args.model, widths=args.widths, epochs=args.epochs,
                                    probe_size=args.probe_size, n_prototypes=args.n_prototypes, lr=args.lr,
                                    batch_size=args.batch_size, seed=args.seed, dataset_record=record,
                                    device=args.device, precision=args.precision,
                                    memory_budget=args.memory_budget)
    test = load_dataset(args.data, root=args.data_root, train=False, size=args.size)
    ev = evaluate(model, test, calibration_images(train), device=args.device, num_classes=train.num_classes,
                  memory_budget=args.memory_budget)
    data = {"run": str(store.path), "layer": layer, "checkpoints": store.finished_steps(),
            "test_accuracy": ev["accuracy"], "train_samples": len(train), "test_samples": len(test)}
    emit(args, data, f"i2x train: run {store.path}: {len(store.finished_steps())} checkpoints, prototypes, weights; "
                     f"test accuracy {100 * ev['accuracy']:.1f}% on {len(test)} images\n"
                     f"  next: i2x analyze {store.path}")
    return 0
