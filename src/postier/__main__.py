from postier.cli import main

main()
