from kontextd.cli import main

main()
