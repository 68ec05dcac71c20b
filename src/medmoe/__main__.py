from medmoe.cli import main

main()
