from herder.cli import main

main()
