from almanet.cli import main

main()
