from convoy.cli import main

main()
