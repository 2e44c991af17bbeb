from saw_eval.cli import main

main()
