from meshnet.cli import main

main()
